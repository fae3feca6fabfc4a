// Training extensions tch does not bind:
//
// - glm_set_grad: makes a view of the flat gradient buffer a parameter's
//   `.grad`, so autograd accumulates into the buffer in place (no per-step
//   concatenation of gradients);
// - glm_recompute: activation checkpointing as a libtorch autograd function.
//   Forward runs a Rust closure under no_grad and keeps only its input and
//   the random-generator state; backward restores that state, re-runs the
//   closure with grad enabled and back-propagates through it, so dropout
//   masks and gradients are those of the run without checkpointing.
//
// - glm_set_grad_hook / glm_clear_grad: ZeRO stage 2's gradient hook. After
//   autograd accumulates a parameter's gradient, a Rust closure takes it
//   (copies it into the reduction bucket) and the parameter's `.grad` is
//   released, so no rank keeps the full gradient;
//
// - glm_fused_adamw: libtorch's multi-tensor AdamW kernel (`_fused_adamw_`,
//   what torch.optim.AdamW(fused=True) runs) over lists of flat ranges.
//
// - glm_cuda_allocated_bytes: the CUDA caching allocator's bytes in use
//   (what the device profile's attention measurement reads).
//
// - glm_torch_version / glm_cpu_capability: the libtorch version and the CPU
//   kernel family ATen dispatches to (DEFAULT, AVX2, AVX512, ...: what
//   torch.backends.cpu.get_cpu_capability() says), which decide the exact
//   floating-point results on the CPU.
//
// Ownership across the boundary as in tp_autograd.cpp: every `torch::Tensor*`
// handed to Rust is owned by Rust afterwards, every one returned from Rust is
// owned (and freed) here; C++ exceptions never cross into Rust.
#include <ATen/Context.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <ATen/Version.h>
#include <torch/version.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#include <stdexcept>
#include <string>

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

extern "C" {
// Runs the closure `ctx` on `x`; returns a new tensor, or null with *err set.
typedef torch::Tensor* (*glm_closure_call_fn)(void* ctx, torch::Tensor* x, int32_t* err);
// Frees the closure `ctx`.
typedef void (*glm_closure_drop_fn)(void* ctx);
}

static thread_local std::string g_ext_error;

// The Rust closure, freed when the autograd node that keeps it dies (after
// backward, or with the graph when backward never runs).
struct RustClosure : torch::CustomClassHolder {
    void* ctx;
    glm_closure_call_fn call;
    glm_closure_drop_fn drop;
    RustClosure(void* c, glm_closure_call_fn f, glm_closure_drop_fn d) : ctx(c), call(f), drop(d) {}
    ~RustClosure() override { drop(ctx); }
    torch::Tensor run(const torch::Tensor& x) const {
        int32_t err = 0;
        torch::Tensor* out = call(ctx, new torch::Tensor(x), &err);
        if (err || !out) throw std::runtime_error("activation recompute: the layer chunk failed (see the log)");
        torch::Tensor r = *out;
        delete out;
        return r;
    }
};

// The default generators a chunk on `device` draws from: the CPU one always,
// and the device's own on CUDA.
struct RngStates {
    torch::Tensor cpu, cuda;
    static RngStates capture(const c10::Device& device) {
        RngStates s;
        {
            auto gen = at::globalContext().defaultGenerator(c10::DeviceType::CPU);
            std::lock_guard<std::mutex> lock(gen.mutex());
            s.cpu = gen.get_state();
        }
        if (device.is_cuda()) {
            auto gen = at::globalContext().defaultGenerator(device);
            std::lock_guard<std::mutex> lock(gen.mutex());
            s.cuda = gen.get_state();
        }
        return s;
    }
    void restore(const c10::Device& device) const {
        {
            auto gen = at::globalContext().defaultGenerator(c10::DeviceType::CPU);
            std::lock_guard<std::mutex> lock(gen.mutex());
            gen.set_state(cpu);
        }
        if (device.is_cuda() && cuda.defined()) {
            auto gen = at::globalContext().defaultGenerator(device);
            std::lock_guard<std::mutex> lock(gen.mutex());
            gen.set_state(cuda);
        }
    }
};

struct Recompute : public torch::autograd::Function<Recompute> {
    static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, c10::intrusive_ptr<RustClosure> f) {
        // custom forwards run with grad disabled: nothing inside is kept
        RngStates s = RngStates::capture(x.device());
        torch::Tensor y = f->run(x);
        ctx->save_for_backward({x});
        ctx->saved_data["f"] = c10::IValue::make_capsule(f);
        ctx->saved_data["rng_cpu"] = s.cpu;
        if (s.cuda.defined()) ctx->saved_data["rng_cuda"] = s.cuda;
        return y;
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        torch::Tensor x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
        auto f = c10::static_intrusive_pointer_cast<RustClosure>(ctx->saved_data["f"].toCapsule());
        RngStates saved;
        saved.cpu = ctx->saved_data["rng_cpu"].toTensor();
        if (ctx->saved_data.count("rng_cuda")) saved.cuda = ctx->saved_data["rng_cuda"].toTensor();
        RngStates now = RngStates::capture(x.device());
        saved.restore(x.device());
        torch::Tensor y;
        {
            at::AutoGradMode on(true);
            y = f->run(x);
        }
        now.restore(x.device());
        torch::autograd::backward({y}, {g[0]});
        return {x.grad(), torch::Tensor()};
    }
};

extern "C" {
// Hands a parameter's accumulated gradient to `ctx`; returns 0, or sets *err.
typedef void (*glm_grad_hook_fn)(void* ctx, torch::Tensor* grad, int32_t* err);
}

// Runs after AccumulateGrad: the closure consumes the gradient, then the
// parameter's `.grad` is released.
struct RustGradHook : torch::autograd::PostAccumulateGradHook {
    void* ctx;
    glm_grad_hook_fn call;
    glm_closure_drop_fn drop;
    RustGradHook(void* c, glm_grad_hook_fn f, glm_closure_drop_fn d) : ctx(c), call(f), drop(d) {}
    ~RustGradHook() override { drop(ctx); }
    void operator()(const torch::autograd::Variable& param) override {
        int32_t err = 0;
        call(ctx, new torch::Tensor(param.grad()), &err);
        if (err) throw std::runtime_error("ZeRO stage 2 gradient reduction failed (see the log)");
        param.mutable_grad().reset();
    }
};

extern "C" {
const char* glm_ext_last_error() { return g_ext_error.c_str(); }

// The libtorch version this shim was compiled against ("2.11.0").
const char* glm_torch_version() { return TORCH_VERSION; }

// ATen's CPU capability, copied into `buf` (NUL-terminated, cut to `len`).
void glm_cpu_capability(char* buf, int32_t len) {
    if (len <= 0) return;
    std::string s;
    try {
        s = at::get_cpu_capability();
    } catch (const std::exception& e) {
        s = "?";
    }
    size_t n = std::min(s.size(), static_cast<size_t>(len - 1));
    s.copy(buf, n);
    buf[n] = 0;
}

// Bytes the CUDA caching allocator has handed out on device `index` and not
// taken back (torch.cuda.memory_allocated), or -1 where there is no CUDA
// allocator (a CPU-only libtorch, no device).
int64_t glm_cuda_allocated_bytes(int32_t index) {
    try {
        auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(static_cast<c10::DeviceIndex>(index));
        return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].current;
    } catch (...) {
        return -1;
    }
}

// Installs the gradient hook of `param` (replacing any), taking ownership of
// `ctx` (freed through `drop`, also on failure). Returns 0, or -1.
int32_t glm_set_grad_hook(torch::Tensor* param, void* ctx, glm_grad_hook_fn call, glm_closure_drop_fn drop) {
    std::unique_ptr<torch::autograd::PostAccumulateGradHook> hook;
    try {
        hook.reset(new RustGradHook(ctx, call, drop));
    } catch (const std::exception& e) {
        drop(ctx);
        g_ext_error = e.what();
        return -1;
    }
    try {
        torch::autograd::impl::set_post_acc_grad_hooks(*param, std::move(hook));
        return 0;
    } catch (const std::exception& e) {
        g_ext_error = e.what();
        return -1;
    }
}

// param.grad = undefined.
void glm_clear_grad(torch::Tensor* param) { param->mutable_grad().reset(); }

// param.grad = grad (a view of the flat gradient buffer). Returns 0, or -1
// with the message kept for glm_ext_last_error.
int32_t glm_set_grad(torch::Tensor* param, torch::Tensor* grad) {
    try {
        if (grad->sizes() != param->sizes() || grad->scalar_type() != param->scalar_type() || grad->device() != param->device())
            throw std::runtime_error("gradient view does not match its parameter (shape, dtype or device)");
        param->mutable_grad() = *grad;
        return 0;
    } catch (const std::exception& e) {
        g_ext_error = e.what();
        return -1;
    }
}

// One AdamW step (step number `step`, counted from 1) of n tensors with
// their gradients and moments, all updated in place. Returns 0, or -1 with
// the message kept for glm_ext_last_error.
int32_t glm_fused_adamw(torch::Tensor** params, torch::Tensor** grads, torch::Tensor** exp_avgs, torch::Tensor** exp_avg_sqs, int32_t n,
                        double step, double lr, double beta1, double beta2, double weight_decay, double eps) {
    try {
        std::vector<torch::Tensor> p, g, m, v, steps;
        for (int32_t i = 0; i < n; i++) {
            p.push_back(*params[i]);
            g.push_back(*grads[i]);
            m.push_back(*exp_avgs[i]);
            v.push_back(*exp_avg_sqs[i]);
            steps.push_back(torch::full({}, step, params[i]->options().dtype(torch::kFloat)));
        }
        at::NoGradGuard no_grad;
        at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, false, false);
        return 0;
    } catch (const std::exception& e) {
        g_ext_error = e.what();
        return -1;
    }
}

// y = closure(x), recomputed in backward. Takes ownership of the closure
// (freed through `drop`, also on failure). Returns null on failure.
torch::Tensor* glm_recompute(torch::Tensor* x, void* ctx, glm_closure_call_fn call, glm_closure_drop_fn drop) {
    auto f = c10::make_intrusive<RustClosure>(ctx, call, drop);
    try {
        return new torch::Tensor(Recompute::apply(*x, f));
    } catch (const std::exception& e) {
        g_ext_error = e.what();
        return nullptr;
    }
}
}
