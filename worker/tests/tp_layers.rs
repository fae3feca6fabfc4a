//! Tensor-parallel layers against their serial versions, like the original's
//! `mpu/tests`: outputs and gradients on two MPI ranks (the parent test runs
//! the `#[ignore]`d child under mpirun) and on a group of one.

use glm_worker::parallel::layers::{column_parallel_linear, row_parallel_linear, vocab_parallel_cross_entropy, vocab_parallel_embedding};
use std::sync::Arc;

use glm_worker::parallel::mappings::Group;
use tch::{Kind, Tensor};

mod common;

/// The same "random" master tensors on every rank.
fn master(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Double, tch::Device::Cpu))
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().copy().set_requires_grad(true)
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}: shapes");
    assert!(a.allclose(b, 1e-10, 1e-10, false), "{what}: {a:?} vs {b:?}");
}

/// Every layer on group `g` (rank r of p) against the serial computation.
fn check_layers(g: &Group) {
    let (r, p) = (g.rank as i64, g.size as i64);
    // column-parallel linear: out 6 split by rows, gathered output
    let (x, w, b, ry) = (master(&[3, 4], 1), master(&[6, 4], 2), master(&[6], 3), master(&[3, 6], 4));
    let (xs, ws, bs) = (leaf(&x), leaf(&w), leaf(&b));
    let ys = xs.linear(&ws, Some(&bs));
    (&ys * &ry).sum(Kind::Double).backward();
    let n = 6 / p;
    let (xp, wp, bp) = (leaf(&x), leaf(&w.narrow(0, r * n, n)), leaf(&b.narrow(0, r * n, n)));
    let yp = column_parallel_linear(&xp, &wp, Some(&bp), g, true).unwrap();
    close(&yp, &ys, "column output");
    (&yp * &ry).sum(Kind::Double).backward();
    close(&wp.grad(), &ws.grad().narrow(0, r * n, n), "column weight grad");
    close(&bp.grad(), &bs.grad().narrow(0, r * n, n), "column bias grad");
    close(&xp.grad(), &xs.grad(), "column input grad");

    // row-parallel linear: in 6 split by columns, full input scattered
    let (x, w, b, ry) = (master(&[3, 6], 5), master(&[4, 6], 6), master(&[4], 7), master(&[3, 4], 8));
    let (xs, ws, bs) = (leaf(&x), leaf(&w), leaf(&b));
    (xs.linear(&ws, Some(&bs)) * &ry).sum(Kind::Double).backward();
    let (xp, wp, bp) = (leaf(&x), leaf(&w.narrow(1, r * n, n)), leaf(&b));
    let yp = row_parallel_linear(&xp, &wp, Some(&bp), g, false).unwrap();
    close(&yp, &xs.linear(&ws, Some(&bs)), "row output");
    (&yp * &ry).sum(Kind::Double).backward();
    close(&wp.grad(), &ws.grad().narrow(1, r * n, n), "row weight grad");
    close(&bp.grad(), &bs.grad(), "row bias grad");
    close(&xp.grad(), &xs.grad(), "row input grad");

    // vocab-parallel embedding: 10 ids split by rows
    let ids = Tensor::from_slice(&[0i64, 9, 4, 5, 7, 2]).view([2, 3]);
    let (w, ry) = (master(&[10, 3], 9), master(&[2, 3, 3], 10));
    let ws = leaf(&w);
    let ys = Tensor::embedding(&ws, &ids, -1, false, false);
    (&ys * &ry).sum(Kind::Double).backward();
    let v = 10 / p;
    let wp = leaf(&w.narrow(0, r * v, v));
    let yp = vocab_parallel_embedding(&ids, &wp, g).unwrap();
    close(&yp, &ys, "embedding output");
    (&yp * &ry).sum(Kind::Double).backward();
    close(&wp.grad(), &ws.grad().narrow(0, r * v, v), "embedding grad");

    // vocab-parallel cross entropy: per-token losses and logit gradients
    let logits = master(&[5, 10], 11) * 3.0;
    let targets = Tensor::from_slice(&[0i64, 9, 4, 5, 7]);
    let ls = leaf(&logits);
    let serial = ls.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::None, -100, 0.0);
    serial.sum(Kind::Double).backward();
    let lp = leaf(&logits.narrow(1, r * v, v));
    let par = vocab_parallel_cross_entropy(&lp, &targets, g).unwrap();
    close(&par, &serial, "cross entropy");
    par.sum(Kind::Double).backward();
    close(&lp.grad(), &ls.grad().narrow(1, r * v, v), "cross entropy logits grad");
}

#[test]
fn layers_on_a_group_of_one_are_the_serial_layers() {
    // a group of one: every layer is the serial layer
    let one = glm_worker::comm::local::LocalComm::group(1, "tp").remove(0);
    check_layers(&Group::new(Arc::new(one)));
}

#[test]
fn layers_on_two_mpi_ranks_match_the_serial_layers() {
    common::run_child_on_two_ranks("child_two_ranks");
}

#[test]
#[ignore = "runs under mpirun, started by layers_on_two_mpi_ranks_match_the_serial_layers"]
fn child_two_ranks() {
    let world = glm_worker::comm::mpi::world().unwrap();
    assert_eq!(glm_worker::comm::Communicator::size(&world), 2);
    check_layers(&Group::new(Arc::new(world)));
    glm_worker::comm::mpi::finalize();
}
