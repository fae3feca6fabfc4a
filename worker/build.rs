//! 1. Bakes the libtorch location found by torch-sys (DEP_TCH_LIBTORCH_LIB)
//!    into every binary and test as an rpath, and hands it to the
//!    `glm-worker` entry point as the first place to look at run time.
//! 2. Compiles csrc/mpi_shim.c (in-place MPI_Allreduce) against the MPI
//!    headers that rsmpi's own probe finds.
//! 3. Compiles csrc/tp_autograd.cpp (tensor-parallel autograd functions)
//!    and csrc/train_ext.cpp (gradient views, activation recomputation)
//!    against the libtorch headers.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/mpi_shim.c");
    println!("cargo:rerun-if-changed=csrc/tp_autograd.cpp");
    println!("cargo:rerun-if-changed=csrc/train_ext.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports its libtorch (DEP_TCH_LIBTORCH_LIB)");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=GLM_BUILD_LIBTORCH_LIB={lib}");
    // 3. The tensor-parallel autograd functions, against the same libtorch
    //    (the PyPI torch 2.11 wheels use the C++11 ABI).
    let include = std::path::Path::new(&lib).join("../include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/tp_autograd.cpp")
        .file("csrc/train_ext.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("glm_tp_autograd");
    let mpi =
        build_probe_mpi::probe().unwrap_or_else(|e| panic!("MPI not found ({e:?}); install OpenMPI (openmpi-bin libopenmpi-dev) — scripts/setup.sh does"));
    let mut cc = cc::Build::new();
    cc.file("csrc/mpi_shim.c").warnings(true);
    for p in &mpi.include_paths {
        cc.include(p);
    }
    cc.compile("glm_mpi_shim");
}
