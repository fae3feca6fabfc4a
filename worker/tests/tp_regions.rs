//! The tensor-parallel autograd regions (`parallel::mappings`) with real MPI
//! collectives: the parent test runs the `#[ignore]`d child below on two ranks
//! under mpirun and checks that every rank passed.

use glm_worker::comm::Communicator;
use std::sync::Arc;

use glm_worker::parallel::mappings::{copy_to, gather_from, reduce_from, scatter_to, Group};
use tch::{Kind, Tensor};

mod common;

#[test]
fn regions_over_two_mpi_ranks() {
    common::run_child_on_two_ranks("child_two_ranks");
}

fn full(v: f64, shape: &[i64]) -> Tensor {
    Tensor::full(shape, v, (Kind::Float, tch::Device::Cpu))
}

#[test]
#[ignore = "runs under mpirun, started by regions_over_two_mpi_ranks"]
fn child_two_ranks() {
    let world = glm_worker::comm::mpi::world().unwrap();
    let r = world.rank() as f64;
    assert_eq!(world.size(), 2);
    let g = Group::new(Arc::new(world));

    // copy_to: identity; gradients summed over ranks (1 + 2)
    let x = full(r + 1.0, &[2, 4]).set_requires_grad(true);
    let y = copy_to(&x, &g).unwrap();
    assert!(y.equal(&x));
    (&y * (r + 1.0)).sum(Kind::Float).backward();
    assert!(x.grad().equal(&full(3.0, &[2, 4])), "copy_to grad {:?}", x.grad());

    // reduce_from: values summed over ranks; gradient passes through
    let x = full(r + 1.0, &[2, 4]).set_requires_grad(true);
    let y = reduce_from(&x, &g).unwrap();
    assert!(y.equal(&full(3.0, &[2, 4])));
    (&y * (r + 1.0)).sum(Kind::Float).backward();
    assert!(x.grad().equal(&full(r + 1.0, &[2, 4])));

    // scatter_to: own half of the last dimension; gradients gathered
    let x = Tensor::arange(8, (Kind::Float, tch::Device::Cpu)).view([2, 4]).set_requires_grad(true);
    let y = scatter_to(&x, &g).unwrap();
    assert!(y.equal(&x.narrow(1, 2 * r as i64, 2)));
    (&y * (r + 1.0)).sum(Kind::Float).backward();
    assert!(x.grad().equal(&Tensor::cat(&[full(1.0, &[2, 2]), full(2.0, &[2, 2])], 1)));

    // gather_from: halves gathered in rank order; gradient keeps own half
    let x = full(r + 1.0, &[2, 2]).set_requires_grad(true);
    let y = gather_from(&x, &g).unwrap();
    assert!(y.equal(&Tensor::cat(&[full(1.0, &[2, 2]), full(2.0, &[2, 2])], 1)));
    let w = Tensor::arange(8, (Kind::Float, tch::Device::Cpu)).view([2, 4]);
    (&y * &w).sum(Kind::Float).backward();
    assert!(x.grad().equal(&w.narrow(1, 2 * r as i64, 2)));

    drop(g);
    glm_worker::comm::mpi::finalize();
}
