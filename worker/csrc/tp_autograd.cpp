// Megatron's conjugate tensor-parallel regions as libtorch autograd
// functions (tch cannot define custom autograd functions). The collective in
// each direction is a callback into Rust (`glm_collective`), which runs it on
// the group's communicator:
//
//   region           forward              backward
//   copy_to          identity             all-reduce (sum)
//   reduce_from      all-reduce (sum)     identity
//   scatter_to       keep own slice of    all-gather along the
//                    the last dimension   last dimension
//   gather_from      all-gather along     keep own slice of the
//                    the last dimension   last dimension
//
// The group is a Rust value (a shared communicator) handed over as an opaque
// pointer with its drop function; the autograd node that needs it in
// backward keeps it alive (as a capsule), so no registry of groups exists.
//
// Tensors cross the boundary as heap `torch::Tensor*` (tch's C_tensor):
// every pointer passed to Rust is owned by Rust afterwards, and every pointer
// returned from Rust is owned (and freed) here. C++ exceptions never cross
// into Rust: entry points catch them and return null with the message kept
// for `glm_tp_last_error`.
#include <torch/torch.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

extern "C" {
// op: 0 all-reduce sum in place (returns null), 1 all-gather along the last
// dimension (returns the gathered tensor). Returns null and sets *err != 0 on failure.
typedef torch::Tensor* (*glm_collective_fn)(int32_t op, void* group, torch::Tensor* t, int32_t* err);
// Releases a group handle.
typedef void (*glm_group_drop_fn)(void* group);
}

static std::atomic<glm_collective_fn> g_collective{nullptr};
static thread_local std::string g_last_error;

// A Rust group handle, released when the last holder (an autograd node, or
// the call that made it) lets go.
struct RustGroup : torch::CustomClassHolder {
    void* ctx;
    glm_group_drop_fn drop;
    RustGroup(void* c, glm_group_drop_fn d) : ctx(c), drop(d) {}
    ~RustGroup() override { drop(ctx); }
};
using GroupPtr = c10::intrusive_ptr<RustGroup>;

static GroupPtr saved_group(AutogradContext* ctx) {
    return c10::static_intrusive_pointer_cast<RustGroup>(ctx->saved_data["group"].toCapsule());
}

static void all_reduce(const torch::Tensor& t, const GroupPtr& group) {
    glm_collective_fn f = g_collective.load();
    if (!f) throw std::runtime_error("tensor-parallel collective callback not registered");
    int32_t err = 0;
    f(0, group->ctx, new torch::Tensor(t), &err);
    if (err) throw std::runtime_error("tensor-parallel all-reduce failed (see the log for the communicator's error)");
}

static torch::Tensor all_gather_last(const torch::Tensor& t, const GroupPtr& group) {
    glm_collective_fn f = g_collective.load();
    if (!f) throw std::runtime_error("tensor-parallel collective callback not registered");
    int32_t err = 0;
    torch::Tensor* out = f(1, group->ctx, new torch::Tensor(t.contiguous()), &err);
    if (err || !out) throw std::runtime_error("tensor-parallel all-gather failed (see the log for the communicator's error)");
    torch::Tensor r = *out;
    delete out;
    return r;
}

static torch::Tensor own_slice_last(const torch::Tensor& t, int64_t rank, int64_t size) {
    int64_t last = t.size(-1);
    if (last % size != 0) throw std::runtime_error("last dimension not divisible by the tensor-parallel size");
    return t.narrow(-1, rank * (last / size), last / size).contiguous();
}

struct CopyTo : public torch::autograd::Function<CopyTo> {
    static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, GroupPtr group) {
        ctx->saved_data["group"] = c10::IValue::make_capsule(group);
        return x.view_as(x);
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        torch::Tensor grad = g[0].clone();
        all_reduce(grad, saved_group(ctx));
        return {grad, torch::Tensor()};
    }
};

struct ReduceFrom : public torch::autograd::Function<ReduceFrom> {
    static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, GroupPtr group) {
        torch::Tensor y = x.clone();
        all_reduce(y, group);
        return y;
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        return {g[0], torch::Tensor()};
    }
};

struct ScatterTo : public torch::autograd::Function<ScatterTo> {
    static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, GroupPtr group, int64_t rank, int64_t size) {
        ctx->saved_data["group"] = c10::IValue::make_capsule(group);
        return own_slice_last(x, rank, size);
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        return {all_gather_last(g[0], saved_group(ctx)), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
};

struct GatherFrom : public torch::autograd::Function<GatherFrom> {
    static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, GroupPtr group, int64_t rank, int64_t size) {
        ctx->saved_data["rank"] = rank;
        ctx->saved_data["size"] = size;
        return all_gather_last(x, group);
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        return {own_slice_last(g[0], ctx->saved_data["rank"].toInt(), ctx->saved_data["size"].toInt()), torch::Tensor(), torch::Tensor(),
                torch::Tensor()};
    }
};

template <typename F>
static torch::Tensor* guarded(F f) {
    try {
        return new torch::Tensor(f());
    } catch (const std::exception& e) {
        g_last_error = e.what();
        return nullptr;
    }
}

// `guarded` for the entries that take a group handle: the handle is owned
// (and released) even when allocating its holder fails.
template <typename F>
static torch::Tensor* guarded_with(void* g, glm_group_drop_fn drop, F f) {
    GroupPtr group;
    try {
        group = c10::make_intrusive<RustGroup>(g, drop);
    } catch (const std::exception& e) {
        drop(g);
        g_last_error = e.what();
        return nullptr;
    }
    return guarded([&] { return f(group); });
}

extern "C" {
void glm_tp_set_collective(glm_collective_fn f) { g_collective.store(f); }
const char* glm_tp_last_error() { return g_last_error.c_str(); }
// Each entry takes ownership of the group handle `g` (released through
// `drop` when no autograd node needs it any more, also on failure).
torch::Tensor* glm_tp_copy_to(torch::Tensor* x, void* g, glm_group_drop_fn drop) {
    return guarded_with(g, drop, [&](const GroupPtr& group) { return CopyTo::apply(*x, group); });
}
torch::Tensor* glm_tp_reduce_from(torch::Tensor* x, void* g, glm_group_drop_fn drop) {
    return guarded_with(g, drop, [&](const GroupPtr& group) { return ReduceFrom::apply(*x, group); });
}
torch::Tensor* glm_tp_scatter_to(torch::Tensor* x, void* g, glm_group_drop_fn drop, int64_t rank, int64_t size) {
    return guarded_with(g, drop, [&](const GroupPtr& group) { return ScatterTo::apply(*x, group, rank, size); });
}
torch::Tensor* glm_tp_gather_from(torch::Tensor* x, void* g, glm_group_drop_fn drop, int64_t rank, int64_t size) {
    return guarded_with(g, drop, [&](const GroupPtr& group) { return GatherFrom::apply(*x, group, rank, size); });
}
}
