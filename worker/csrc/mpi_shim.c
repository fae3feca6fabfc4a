/* In-place MPI_Allreduce for glm-worker's MPI back end. rsmpi (the Rust MPI
 * binding) does not expose MPI_IN_PLACE, whose value differs between MPI
 * implementations, so it is taken from the real <mpi.h> here.
 * kind: 0 float, 1 double, 2 int64; op: 0 sum, 1 max. Returns the MPI error
 * code, or -1 for an unknown kind/op. */
#include <mpi.h>
#include <stdint.h>

int glm_allreduce_inplace(void *buf, int count, int kind, int op, MPI_Comm comm) {
    MPI_Datatype dt;
    switch (kind) {
        case 0: dt = MPI_FLOAT; break;
        case 1: dt = MPI_DOUBLE; break;
        case 2: dt = MPI_INT64_T; break;
        default: return -1;
    }
    MPI_Op o;
    switch (op) {
        case 0: o = MPI_SUM; break;
        case 1: o = MPI_MAX; break;
        default: return -1;
    }
    return MPI_Allreduce(MPI_IN_PLACE, buf, count, dt, o, comm);
}

/* In-place MPI_Allgather of `bytes` bytes per rank: this rank's block
 * already sits at its slot of `buf` (size × bytes). */
int glm_allgather_inplace(void *buf, int bytes, MPI_Comm comm) {
    return MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, bytes, MPI_BYTE, comm);
}

/* MPI_Reduce_scatter_block (sum) of `count` elements per rank; kind as above. */
int glm_reduce_scatter_block(const void *send, void *recv, int count, int kind, MPI_Comm comm) {
    MPI_Datatype dt;
    switch (kind) {
        case 0: dt = MPI_FLOAT; break;
        case 1: dt = MPI_DOUBLE; break;
        default: return -1;
    }
    return MPI_Reduce_scatter_block(send, recv, count, dt, MPI_SUM, comm);
}
