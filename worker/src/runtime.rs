//! libtorch start-up facts, printed by `glm-worker env`.

/// Versions and devices as libtorch sees them.
pub fn describe() -> Vec<(String, String)> {
    let mut out = vec![
        ("glm-worker".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("libtorch dir".into(), std::env::var("GLM_LIBTORCH_LIB").unwrap_or_else(|_| option_env!("GLM_BUILD_LIBTORCH_LIB").unwrap_or("?").into())),
        ("intra-op threads".into(), tch::get_num_threads().to_string()),
        ("cuda available".into(), tch::Cuda::is_available().to_string()),
        ("cuda devices".into(), tch::Cuda::device_count().to_string()),
    ];
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    out.push(("cpu tensor check".into(), format!("sum(1,2,3) = {}", t.sum(tch::Kind::Float).double_value(&[]))));
    out
}
