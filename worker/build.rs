//! Bakes the libtorch location found by torch-sys (DEP_TCH_LIBTORCH_LIB) into
//! every binary and test as an rpath, and hands it to the `glm-worker` entry
//! point as the first place to look for libtorch at run time.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=GLM_BUILD_LIBTORCH_LIB={dir}");
    }
}
