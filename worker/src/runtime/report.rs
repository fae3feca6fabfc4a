//! libtorch errors as one-line messages.
//!
//! tch turns every libtorch exception into a panic (`unwrap` of a `TchError`)
//! unless the `f_` variant is called. Rather than let a user's oversized model
//! or bad shape print a C++ stack trace, the process records what it is doing
//! (`doing`), a panic hook captures the panic with that context, and the
//! entry point (`catch`) reports it as one line.

thread_local! {
    static DOING: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    /// How many `catch` calls this thread is inside: only there is a
    /// libtorch panic reported by `catch` instead of the default hook.
    static CATCH_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Names, while alive, what this thread is doing: errors libtorch raises
/// meanwhile say it (the innermost guard wins). Not `Send`: it belongs to the
/// thread whose stack it pushed.
pub struct Doing(std::marker::PhantomData<*const ()>);

/// Starts naming `what` ("building the model (...)") for libtorch errors.
pub fn doing(what: impl Into<String>) -> Doing {
    DOING.with(|d| d.borrow_mut().push(what.into()));
    Doing(std::marker::PhantomData)
}

impl Drop for Doing {
    fn drop(&mut self) {
        let _ = DOING.try_with(|d| d.borrow_mut().pop());
    }
}

/// What this thread is doing now (the innermost `doing`).
fn doing_now() -> Option<String> {
    DOING.try_with(|d| d.borrow().last().cloned()).ok().flatten()
}

/// A panic as the hook saw it, before unwinding dropped the `Doing` guards.
struct Caught {
    message: String,
    location: String,
    doing: Option<String>,
}

thread_local! {
    /// The last panic of this thread (`catch` runs on the panicking thread).
    static LAST_PANIC: std::cell::RefCell<Option<Caught>> = const { std::cell::RefCell::new(None) };
}

/// Wraps the panic hook (once per process): every panic is recorded, with
/// what the thread was doing, for `catch` to report. A libtorch error inside
/// `catch` prints nothing more unless `RUST_BACKTRACE` is set (not `0`); any
/// other panic, and any panic outside `catch`, also gets the default report.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        let verbose = std::env::var("RUST_BACKTRACE").is_ok_and(|v| v != "0");
        std::panic::set_hook(Box::new(move |info| {
            let message = panic_text(info.payload());
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            let doing = doing_now();
            let quiet = torch_payload(&message).is_some() && CATCH_DEPTH.try_with(|c| c.get() > 0).unwrap_or(false);
            let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(Caught { message, location, doing }));
            if verbose || !quiet {
                default(info);
            }
        }));
    });
}

/// The text a panic carries (`panic!` formats a `String`, a literal a `&str`).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "(no message)".into())
}

/// A panic's text in one line: libtorch's message condensed (`torch_message`)
/// when it is a libtorch error.
pub fn panic_summary(payload: &(dyn std::any::Any + Send)) -> String {
    let text = panic_text(payload);
    match torch_payload(&text) {
        Some(raw) => format!("libtorch: {}", torch_message(&raw)),
        None => one_line(&text),
    }
}

/// Runs `f`; a panic inside it becomes an error of one line: for a libtorch
/// error, what was being done and libtorch's message (an allocation failure
/// says how much memory was asked for); for anything else, an internal error
/// with its source location.
pub fn catch<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    CATCH_DEPTH.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCH_DEPTH.with(|c| c.set(c.get() - 1));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let caught = LAST_PANIC.with(|p| p.borrow_mut().take());
            let caught = caught.unwrap_or_else(|| Caught { message: panic_text(&*payload), location: String::new(), doing: None });
            Err(anyhow::anyhow!(report(&caught)))
        }
    }
}

fn report(c: &Caught) -> String {
    match torch_payload(&c.message) {
        Some(raw) => in_context(c.doing.as_deref(), &raw),
        None => {
            let doing = c.doing.as_ref().map(|d| format!(" while {d}")).unwrap_or_default();
            let at = if c.location.is_empty() { String::new() } else { format!("{}; ", c.location) };
            format!("internal error{doing}: {} ({at}a bug: please report it, with the output of RUST_BACKTRACE=1)", one_line(&c.message))
        }
    }
}

/// libtorch's error `raw` as one line after what this thread is doing, with
/// a hint when it ran out of memory (for errors libtorch returns rather than
/// panics on, e.g. from `backward`).
pub fn torch_error(raw: &str) -> String {
    in_context(doing_now().as_deref(), raw)
}

fn in_context(doing: Option<&str>, raw: &str) -> String {
    let msg = torch_message(raw);
    let hint = if msg.starts_with("out of ") { oom_hint(doing) } else { "" };
    match doing {
        Some(d) => format!("{d}: libtorch: {msg}{hint}"),
        None => format!("libtorch: {msg}{hint}"),
    }
}

/// The hint for a model too large for the memory it was given. On one
/// machine, more ranks share the same memory: only a smaller model or more
/// machines help.
pub const MODEL_TOO_LARGE_HINT: &str = "\nHINT: a smaller model (hidden_size, num_layers), or the model split over ranks on more machines or GPUs \
     (model_parallel_size; ZeRO stage 1 or 2 shards the optimizer state over data-parallel ranks)";

fn oom_hint(doing: Option<&str>) -> &'static str {
    let d = doing.unwrap_or_default();
    if d.starts_with("building the model") || d.starts_with("allocating the optimizer") {
        MODEL_TOO_LARGE_HINT
    } else if d.starts_with("training") {
        "\nHINT: a smaller train_micro_batch_size_per_gpu (keep the global batch with gradient_accumulation_steps), \
         --set checkpoint_activations=true, or a shorter seq_length"
    } else if d.starts_with("evaluating") {
        "\nHINT: a smaller evaluation batch (eval_batch_size, or eval's --batch-size)"
    } else if d.starts_with("generating") {
        "\nHINT: a shorter text or fewer --max-tokens"
    } else {
        ""
    }
}

/// The string inside `Torch("...")` of an unwrapped `TchError`'s `Debug`
/// form, unescaped; `None` when the panic is not a libtorch error.
fn torch_payload(message: &str) -> Option<String> {
    let Some(start) = message.find("Torch(\"").map(|i| i + "Torch(\"".len()) else {
        // a `TchError` formatted with Display
        return message.find("Internal torch error: ").map(|i| message[i..].to_string());
    };
    let mut out = String::new();
    let mut chars = message[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                'u' => {
                    // \u{XXXX}
                    let hex: String = chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                    out.extend(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32));
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// libtorch's error text as one line: no C++ frames or "Exception raised
/// from" trailer, no `[enforce fail at file:line] condition.` prefix, and an
/// allocation failure rewritten to say how much memory was asked for.
pub fn torch_message(raw: &str) -> String {
    let mut s = raw.strip_prefix("Internal torch error: ").unwrap_or(raw);
    for cut in ["\nframe #", "\nException raised from", "Exception raised from"] {
        if let Some(i) = s.find(cut) {
            s = &s[..i];
        }
    }
    let mut s = s.trim().to_string();
    if s.starts_with("[enforce fail at") {
        if let Some(close) = s.find("] ") {
            let rest = &s[close + 2..];
            // the failed condition ("err == 0. ") before the message
            let rest = rest.split_once(". ").map(|(_, m)| m).unwrap_or(rest);
            s = rest.to_string();
        }
    }
    if let Some(bytes) = s.split("you tried to allocate ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<u64>().ok()) {
        let why = s.split("Error code ").nth(1).and_then(|r| r.split_once('(')).map(|(_, w)| w.trim_end_matches(')').to_string());
        return format!("out of CPU memory: asked for {} ({})", super::units::human_bytes(bytes), why.unwrap_or_else(|| "allocation failed".into()));
    }
    if let Some(rest) = s.strip_prefix("CUDA out of memory. ") {
        // "Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 18.44 GiB is free. ..."
        let sentences: Vec<&str> = rest.split(". ").take(2).collect();
        let asked = sentences.first().map(|t| t.trim_start_matches("Tried to allocate ")).unwrap_or("?");
        let gpu = sentences.get(1).map(|g| format!("; {}", g.trim_end_matches('.'))).unwrap_or_default();
        return format!("out of CUDA memory: asked for {asked}{gpu}");
    }
    one_line(&s)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_OOM: &str = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 41236697186304 bytes. Error code 12 (Cannot allocate memory)\\nframe #0: c10::ThrowEnforceNotMet(char const*, int, char const*, std::__cxx11::basic_string<char> const&, void const*) + 0x6a (0x7fb in /x/libc10.so)\\nframe #1: c10::alloc_cpu(unsigned long) + 0x365\\n\")";

    #[test]
    fn an_allocation_failure_says_the_size_on_one_line() {
        let raw = torch_payload(CPU_OOM).unwrap();
        assert!(raw.contains("\nframe #0"), "unescaped: {raw}");
        assert_eq!(torch_message(&raw), "out of CPU memory: asked for 41.2 TB (Cannot allocate memory)");
        let cuda = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 18.44 GiB is free. Including non-PyTorch memory, this process has 60.70 GiB memory in use.\nException raised from malloc at /pytorch/c10/cuda/CUDACachingAllocator.cpp:1\nframe #0: x";
        assert_eq!(torch_message(cuda), "out of CUDA memory: asked for 20.00 GiB; GPU 0 has a total capacity of 79.15 GiB of which 18.44 GiB is free");
        let shape = "shape '[2, 3]' is invalid for input of size 5\nException raised from infer_size_impl at /pytorch/aten/src/ATen/InferSize.h:1 (most recent call first):\nframe #0: x";
        assert_eq!(torch_message(shape), "shape '[2, 3]' is invalid for input of size 5");
        assert_eq!(torch_payload("called `Option::unwrap()` on a `None` value"), None);
    }

    #[test]
    fn a_panic_under_catch_is_one_line_naming_what_was_done() {
        install_panic_hook();
        let e = catch(|| -> anyhow::Result<()> {
            let _d = doing("building the model (test)");
            let r: Result<(), tch::TchError> = Err(tch::TchError::Torch(torch_payload(CPU_OOM).unwrap()));
            #[allow(clippy::unnecessary_literal_unwrap)] // tch's own path to a libtorch panic: unwrap of a TchError
            r.unwrap();
            Ok(())
        })
        .unwrap_err()
        .to_string();
        let first = e.lines().next().unwrap();
        assert_eq!(first, "building the model (test): libtorch: out of CPU memory: asked for 41.2 TB (Cannot allocate memory)");
        assert!(e.lines().nth(1).unwrap().starts_with("HINT: a smaller model"), "{e}");
        assert_eq!(
            torch_error("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB of which 1 GiB is free."),
            "libtorch: out of CUDA memory: asked for 2.00 GiB; GPU 0 has a total capacity of 8 GiB of which 1 GiB is free"
        );
        {
            let _d = doing("evaluating held-out data (test)");
            let e = torch_error("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB of which 1 GiB is free.");
            assert!(e.starts_with("evaluating held-out data (test): libtorch: out of CUDA memory") && e.contains("\nHINT: a smaller evaluation batch"), "{e}");
        }
        DOING.with(|d| assert!(d.borrow().is_empty(), "the guard is gone after unwinding"));
        let e = catch(|| -> anyhow::Result<()> { panic!("index out of range") }).unwrap_err().to_string();
        assert!(e.starts_with("internal error: index out of range (worker/src/runtime/report.rs:") && !e.contains('\n'), "{e}");
    }
}
