//! 1. Bakes the libtorch location found by torch-sys (DEP_TCH_LIBTORCH_LIB)
//!    into every binary and test as an rpath, and hands it to the
//!    `glm-worker` entry point as the first place to look at run time.
//! 2. Compiles csrc/mpi_shim.c (in-place MPI_Allreduce) against the MPI
//!    headers that rsmpi's own probe finds.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/mpi_shim.c");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=GLM_BUILD_LIBTORCH_LIB={dir}");
    }
    let mpi = build_probe_mpi::probe().unwrap_or_else(|e| {
        panic!("MPI not found ({e:?}); install OpenMPI (openmpi-bin libopenmpi-dev) — scripts/setup.sh does")
    });
    let mut cc = cc::Build::new();
    cc.file("csrc/mpi_shim.c").warnings(true);
    for p in &mpi.include_paths {
        cc.include(p);
    }
    cc.compile("glm_mpi_shim");
}
