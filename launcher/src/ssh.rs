//! The `ssh` back end's own SSH client (libssh2 through the `ssh2` crate):
//! every host's address, user, port and keys come from the command line,
//! then `~/.ssh/config` (OpenSSH's precedence: the first value found wins),
//! then OpenSSH's defaults; host keys are checked against `known_hosts`
//! and an unknown or changed key is refused unless the user opts in to
//! unknown ones (a changed key is always refused, as OpenSSH does).
//!
//! Three uses: the preflight runs `glm-worker env` on every host through
//! it; OpenMPI's `mpirun` starts its daemons through it (glm-launch is the
//! `plm_rsh_agent`: `glm-launch --ssh-exec HOST COMMAND...`); and a stop
//! signal reaches the workers of this job on every host through it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use ssh2::{CheckResult, HashType, HostKeyType, KnownHostFileKind, Session};

/// What the user chose for every host (command line and config file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// The ssh config file (default `~/.ssh/config` when it exists).
    pub config: Option<PathBuf>,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity: Option<PathBuf>,
    /// Add unknown host keys to known_hosts instead of refusing them.
    pub accept_new: bool,
}

/// Environment variables that carry `Options` to `glm-launch --ssh-exec`
/// run by mpirun.
const ENV: [&str; 5] = ["GLM_LAUNCH_SSH_CONFIG", "GLM_LAUNCH_SSH_USER", "GLM_LAUNCH_SSH_PORT", "GLM_LAUNCH_SSH_IDENTITY", "GLM_LAUNCH_SSH_ACCEPT_NEW"];

impl Options {
    pub fn to_env(&self) -> Vec<(String, String)> {
        let vals = [
            self.config.as_ref().map(|p| p.display().to_string()),
            self.user.clone(),
            self.port.map(|p| p.to_string()),
            self.identity.as_ref().map(|p| p.display().to_string()),
            self.accept_new.then(|| "1".to_string()),
        ];
        ENV.iter().zip(vals).filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect()
    }

    pub fn from_env() -> Result<Options> {
        let get = |i: usize| std::env::var(ENV[i]).ok().filter(|v| !v.is_empty());
        Ok(Options {
            config: get(0).map(PathBuf::from),
            user: get(1),
            port: get(2).map(|p| p.parse().with_context(|| format!("{}={p}: not a port", ENV[2]))).transpose()?,
            identity: get(3).map(PathBuf::from),
            accept_new: get(4).is_some(),
        })
    }
}

/// One host, resolved: where to connect and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The name in the hostfile.
    pub alias: String,
    /// The address connected to (`HostName`, else the alias).
    pub addr: String,
    pub port: u16,
    pub user: String,
    /// Private keys to try after the agent's, in order.
    pub identities: Vec<PathBuf>,
    /// known_hosts files read (the first also receives accepted new keys).
    pub known_hosts: Vec<PathBuf>,
    pub accept_new: bool,
    /// `HostKeyAlias`: the name known_hosts lists this host's key under.
    pub host_key_alias: Option<String>,
}

impl Target {
    /// `host (addr:port)` for messages.
    pub fn describe(&self) -> String {
        if self.addr == self.alias {
            format!("{}:{}", self.alias, self.port)
        } else {
            format!("{} ({}:{})", self.alias, self.addr, self.port)
        }
    }

    /// The name known_hosts uses for this address and port.
    fn known_name(&self) -> String {
        if let Some(a) = &self.host_key_alias {
            return a.clone();
        }
        if self.port == 22 {
            self.addr.clone()
        } else {
            format!("[{}]:{}", self.addr, self.port)
        }
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

fn tilde(p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home().join(rest),
        None => PathBuf::from(p),
    }
}

/// OpenSSH's tokens in a path: %h the host name (after HostName), %n the
/// name as given, %r the remote user, %p the port, %u the local user, %d
/// the local home, %% a percent sign; then a leading `~/`.
fn expand(p: &str, t: &Target) -> PathBuf {
    let mut out = String::new();
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(&t.addr),
            Some('n') => out.push_str(&t.alias),
            Some('r') => out.push_str(&t.user),
            Some('p') => out.push_str(&t.port.to_string()),
            Some('u') => out.push_str(&login_name()),
            Some('d') => out.push_str(&home().display().to_string()),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    tilde(&out)
}

/// The local user, as OpenSSH takes it (the password database first).
fn login_name() -> String {
    // SAFETY: getpwuid returns a pointer to static storage or null; read at once.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if !pw.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned();
        }
    }
    std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "root".into())
}

fn unsupported(alias: &str, what: &str, how: &str) -> anyhow::Error {
    anyhow!("{alias}: the ssh config sets {what}, which glm-launch's SSH client does not support ({how})")
}

/// Resolves `alias` as OpenSSH does: the command line, then the config
/// file's first values, then the defaults. With OpenSSH's client installed
/// that is `ssh -G` itself (every `Host`/`Match`/`Include` rule and token
/// exactly as ssh would); without it, a parser of the common keywords.
pub fn resolve(alias: &str, opts: &Options) -> Result<Target> {
    match crate::which("ssh") {
        Some(ssh) => resolve_with_ssh(&ssh, alias, opts),
        None => resolve_with_parser(alias, opts),
    }
}

fn resolve_with_ssh(ssh: &Path, alias: &str, opts: &Options) -> Result<Target> {
    let mut c = std::process::Command::new(ssh);
    c.arg("-G");
    if let Some(f) = &opts.config {
        c.arg("-F").arg(f);
    }
    if let Some(u) = &opts.user {
        c.args(["-l", u]);
    }
    if let Some(p) = opts.port {
        c.args(["-p", &p.to_string()]);
    }
    if let Some(i) = &opts.identity {
        c.arg("-i").arg(i);
    }
    let out = c
        .arg("--")
        .arg(alias)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("{}: cannot run `ssh -G` to read the ssh config", ssh.display()))?;
    if !out.status.success() {
        bail!("{alias}: ssh -G (the ssh config): {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let values =
        |key: &str| -> Vec<String> { text.lines().filter_map(|l| l.split_once(' ')).filter(|(k, _)| *k == key).map(|(_, v)| v.trim().to_string()).collect() };
    let one = |key: &str| values(key).into_iter().next();
    if let Some(j) = one("proxyjump").filter(|v| v != "none") {
        return Err(unsupported(alias, &format!("ProxyJump {j}"), "reach the hosts directly, or use --launcher mpirun with OpenSSH"));
    }
    if let Some(c) = one("proxycommand").filter(|v| v != "none") {
        return Err(unsupported(alias, &format!("ProxyCommand {c}"), "reach the hosts directly, or use --launcher mpirun with OpenSSH"));
    }
    let strict = one("stricthostkeychecking").unwrap_or_default();
    let mut t = Target {
        alias: alias.to_string(),
        addr: one("hostname").unwrap_or_else(|| alias.to_string()),
        port: one("port").and_then(|p| p.parse().ok()).unwrap_or(22),
        user: one("user").unwrap_or_else(login_name),
        identities: Vec::new(),
        known_hosts: Vec::new(),
        accept_new: opts.accept_new || matches!(strict.as_str(), "accept-new" | "false" | "no" | "off"),
        host_key_alias: one("hostkeyalias").filter(|a| a != "none"),
    };
    // ssh -G prints these paths with their tokens (ssh expands them on use)
    t.identities = values("identityfile").iter().map(|f| expand(f, &t)).collect();
    t.known_hosts = values("userknownhostsfile").iter().flat_map(|v| v.split_whitespace().map(|f| expand(f, &t)).collect::<Vec<_>>()).collect();
    Ok(t)
}

/// Without OpenSSH's client: the config's `Host` blocks (first value wins),
/// refusing `Match` and `Include`, which this parser does not follow.
fn resolve_with_parser(alias: &str, opts: &Options) -> Result<Target> {
    let default_config = home().join(".ssh/config");
    let config_path = opts.config.clone().or_else(|| default_config.is_file().then_some(default_config));
    let params = match &config_path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read the ssh config", p.display()))?;
            for (i, line) in text.lines().enumerate() {
                let word = line.split_whitespace().next().unwrap_or("").to_ascii_lowercase();
                if word == "match" || word == "include" {
                    bail!(
                        "{}:{}: `{}` needs OpenSSH's own reading of the config: install openssh-client (glm-launch then asks `ssh -G`)",
                        p.display(),
                        i + 1,
                        line.trim()
                    );
                }
            }
            let rules = ssh2_config::ParseRule::ALLOW_UNKNOWN_FIELDS | ssh2_config::ParseRule::ALLOW_UNSUPPORTED_FIELDS;
            let cfg =
                ssh2_config::SshConfig::default().parse(&mut std::io::BufReader::new(text.as_bytes()), rules).map_err(|e| anyhow!("{}: {e}", p.display()))?;
            Some(cfg.query(alias))
        }
        None => None,
    };
    let field = |name: &str| -> Option<Vec<String>> {
        let p = params.as_ref()?;
        p.unsupported_fields.iter().chain(p.ignored_fields.iter()).find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    };
    if let Some(j) = params.as_ref().and_then(|p| p.proxy_jump.clone()) {
        return Err(unsupported(alias, &format!("ProxyJump {}", j.join(",")), "reach the hosts directly, or use --launcher mpirun with OpenSSH"));
    }
    if let Some(c) = field("proxycommand") {
        return Err(unsupported(alias, &format!("ProxyCommand {}", c.join(" ")), "reach the hosts directly, or use --launcher mpirun with OpenSSH"));
    }
    let user = opts.user.clone().or_else(|| params.as_ref().and_then(|p| p.user.clone())).unwrap_or_else(login_name);
    let port = opts.port.or_else(|| params.as_ref().and_then(|p| p.port)).unwrap_or(22);
    let mut t = Target {
        alias: alias.to_string(),
        addr: alias.to_string(),
        port,
        user,
        identities: Vec::new(),
        known_hosts: Vec::new(),
        accept_new: opts.accept_new,
        host_key_alias: None,
    };
    // HostName's tokens name the host as given; the others see the result
    if let Some(h) = params.as_ref().and_then(|p| p.host_name.clone()) {
        t.addr = expand(&h, &t).display().to_string();
    }
    t.identities = opts.identity.iter().cloned().collect();
    match params.as_ref().and_then(|p| p.identity_file.clone()) {
        Some(files) => {
            let more: Vec<PathBuf> = files.iter().map(|f| expand(&f.to_string_lossy(), &t)).collect();
            t.identities.extend(more);
        }
        None => t.identities.extend(["id_rsa", "id_ecdsa", "id_ed25519"].iter().map(|n| home().join(".ssh").join(n))),
    }
    t.known_hosts = match field("userknownhostsfile") {
        Some(files) => files.iter().map(|f| expand(f, &t)).collect(),
        None => vec![home().join(".ssh/known_hosts"), home().join(".ssh/known_hosts2")],
    };
    let strict = field("stricthostkeychecking").and_then(|v| v.first().cloned()).unwrap_or_default().to_lowercase();
    t.accept_new |= matches!(strict.as_str(), "accept-new" | "no" | "off");
    t.host_key_alias = field("hostkeyalias").and_then(|v| v.first().cloned());
    Ok(t)
}

fn key_name(t: HostKeyType) -> &'static str {
    match t {
        HostKeyType::Rsa => "ssh-rsa",
        HostKeyType::Dss => "ssh-dss",
        HostKeyType::Ecdsa256 => "ecdsa-sha2-nistp256",
        HostKeyType::Ecdsa384 => "ecdsa-sha2-nistp384",
        HostKeyType::Ecdsa521 => "ecdsa-sha2-nistp521",
        HostKeyType::Ed25519 => "ssh-ed25519",
        HostKeyType::Unknown => "unknown",
    }
}

/// What the known_hosts files say of a server key.
#[derive(Debug, PartialEq, Eq)]
enum KeyVerdict {
    Match,
    /// The host has a key of this type on file, and it differs.
    Changed,
    Unknown,
    /// An `@revoked` line lists this very key.
    Revoked,
}

/// Checks `key` (of `key_type`, base64 `key_b64`) for host `name` (`addr`
/// or `[addr]:port`, exactly as OpenSSH writes it) against known_hosts
/// lines: only entries of the server's key type count (a host known by an
/// ed25519 key that now offers rsa is unknown, not changed); hashed names
/// are matched by libssh2; `@revoked` keys are refused; `@cert-authority`
/// lines are not used (host certificates are not supported).
fn key_verdict(sess: &Session, text: &str, name: &str, key: &[u8], key_type: &str, key_b64: &str) -> Result<KeyVerdict> {
    let mut kh = sess.known_hosts()?;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[0] {
            "@revoked" if fields.get(3) == Some(&key_b64) => return Ok(KeyVerdict::Revoked),
            m if m.starts_with('@') => continue,
            _ if fields.get(1) == Some(&key_type) => {
                // a line libssh2 cannot read (another format) is skipped, as OpenSSH does
                let _ = kh.read_str(line, KnownHostFileKind::OpenSSH);
            }
            _ => {}
        }
    }
    Ok(match kh.check(name, key) {
        CheckResult::Match => KeyVerdict::Match,
        CheckResult::Mismatch => KeyVerdict::Changed,
        CheckResult::NotFound | CheckResult::Failure => KeyVerdict::Unknown,
    })
}

/// Checks the server's host key against the target's known_hosts files;
/// an unknown key is added to the first one when the user opted in.
fn verify_host_key(sess: &Session, t: &Target) -> Result<()> {
    let (key, kind) = sess.host_key().ok_or_else(|| anyhow!("{}: the server sent no host key", t.describe()))?;
    let fingerprint =
        sess.host_key_hash(HashType::Sha256).map(|h| format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(h))).unwrap_or_default();
    let key_b64 = base64::engine::general_purpose::STANDARD.encode(key);
    let mut text = String::new();
    let mut read = Vec::new();
    let name = t.known_name();
    // the file that lists this host by name (in plain text), for the hint that removes its old key
    let mut lists = None;
    for f in t.known_hosts.iter().map(PathBuf::as_path).chain([Path::new("/etc/ssh/ssh_known_hosts")]) {
        if f.is_file() {
            let body = std::fs::read_to_string(f).with_context(|| format!("{}: cannot read known hosts", f.display()))?;
            if lists.is_none() && body.lines().any(|l| l.split_whitespace().next().is_some_and(|h| h.split(',').any(|h| h == name))) {
                lists = Some(f.to_path_buf());
            }
            text.push_str(&body);
            text.push('\n');
            read.push(f.display().to_string());
        }
    }
    let files = if read.is_empty() { "no known_hosts file".to_string() } else { read.join(", ") };
    let remove =
        lists.or_else(|| t.known_hosts.iter().find(|f| f.is_file()).cloned()).map(|f| format!(" -f {}", quote(&f.display().to_string()))).unwrap_or_default();
    match key_verdict(sess, &text, &name, key, key_name(kind), &key_b64)? {
        KeyVerdict::Match => Ok(()),
        KeyVerdict::Revoked => bail!("{}: the server's {} key {fingerprint} is marked @revoked in {files}; refusing to connect", t.describe(), key_name(kind)),
        KeyVerdict::Changed => bail!(
            "{}: HOST KEY CHANGED: the server's {} key {fingerprint} differs from the one in {files}; refusing to connect (someone may be intercepting the connection; if the host was reinstalled, remove the old key with `ssh-keygen -R '{name}'{remove}`)",
            t.describe(),
            key_name(kind)
        ),
        KeyVerdict::Unknown if t.accept_new => {
            let file = t.known_hosts.first().ok_or_else(|| anyhow!("{}: no known_hosts file to add the new key to", t.describe()))?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
            }
            let line = format!("{name} {} {key_b64}\n", key_name(kind));
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).with_context(|| format!("{}: cannot add the host key", file.display()))?;
            f.write_all(line.as_bytes()).with_context(|| format!("{}: cannot add the host key", file.display()))?;
            eprintln!("glm-launch: {}: added its {} key {fingerprint} to {} (--ssh_accept_new_host_keys)", t.describe(), key_name(kind), file.display());
            Ok(())
        }
        KeyVerdict::Unknown => bail!(
            "{}: unknown host key ({} {fingerprint}), not in {files}; refusing to connect: check the fingerprint and add it (`ssh-keyscan -p {} {} >> {}`), or pass --ssh_accept_new_host_keys",
            t.describe(),
            key_name(kind),
            t.port,
            t.addr,
            // the file glm-launch reads first (and --ssh_accept_new_host_keys writes)
            t.known_hosts.first().map_or_else(|| "~/.ssh/known_hosts".to_string(), |f| quote(&f.display().to_string()))
        ),
    }
}

/// Connects, checks the host key and logs in (ssh-agent keys first, then
/// the identity files).
pub fn connect(t: &Target, timeout: Duration) -> Result<Session> {
    let addrs: Vec<_> = (t.addr.as_str(), t.port).to_socket_addrs().with_context(|| format!("{}: cannot resolve the address", t.describe()))?.collect();
    let mut last = None;
    let mut tcp = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| anyhow!("{}: cannot connect: {}", t.describe(), last.map_or_else(|| "no address".to_string(), |e| e.to_string())))?;
    let mut sess = Session::new().context("libssh2 session")?;
    sess.set_timeout(timeout.as_millis() as u32);
    sess.set_tcp_stream(tcp);
    sess.handshake().map_err(|e| anyhow!("{}: SSH handshake failed: {e}", t.describe()))?;
    verify_host_key(&sess, t)?;
    let mut tried = Vec::new();
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        if let Ok(mut agent) = sess.agent() {
            if agent.connect().is_ok() && agent.list_identities().is_ok() {
                for id in agent.identities().unwrap_or_default() {
                    if agent.userauth(&t.user, &id).is_ok() {
                        break;
                    }
                }
                tried.push("ssh-agent keys".to_string());
            }
        }
    }
    for id in &t.identities {
        if sess.authenticated() {
            break;
        }
        if !id.is_file() {
            continue;
        }
        match sess.userauth_pubkey_file(&t.user, None, id, None) {
            Ok(()) => {}
            Err(e) => tried.push(format!("{} ({e})", id.display())),
        }
    }
    if !sess.authenticated() {
        let tried = if tried.is_empty() {
            "no key found (ssh-agent, --ssh_identity, IdentityFile, ~/.ssh/id_*)".to_string()
        } else {
            format!("tried {}", tried.join(", "))
        };
        bail!("{}: login as {} refused: {tried}", t.describe(), t.user);
    }
    sess.set_timeout(0);
    Ok(sess)
}

/// Runs `command` on the host (with `stdin` fed to it), passing its output
/// on as it arrives; returns its exit status (an error after `limit`).
pub fn exec(sess: &Session, command: &str, stdin: &[u8], out: &mut dyn Write, err: &mut dyn Write, limit: Option<Duration>) -> Result<i32> {
    let start = std::time::Instant::now();
    let mut ch = sess.channel_session()?;
    ch.exec(command)?;
    ch.write_all(stdin)?;
    ch.send_eof()?;
    sess.set_blocking(false);
    let mut buf = [0u8; 16384];
    let result = (|| -> Result<()> {
        loop {
            let mut got = false;
            for is_err in [false, true] {
                let r = if is_err { ch.stderr().read(&mut buf) } else { ch.read(&mut buf) };
                match r {
                    Ok(0) => {}
                    Ok(n) => {
                        got = true;
                        let w: &mut dyn Write = if is_err { err } else { out };
                        let _ = w.write_all(&buf[..n]);
                        let _ = w.flush();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if !got {
                if ch.eof() {
                    return Ok(());
                }
                if let Some(l) = limit.filter(|l| start.elapsed() > *l) {
                    bail!("`{}` gave no end within {} s", command, l.as_secs());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })();
    sess.set_blocking(true);
    result?;
    ch.wait_close()?;
    // killed by a signal: no exit status (libssh2 says 0); 255 as ssh does
    if ch.exit_signal().ok().and_then(|s| s.exit_signal).is_some() {
        return Ok(255);
    }
    Ok(ch.exit_status()?)
}

/// Runs `command` and collects its output: (status, stdout, stderr).
pub fn output(sess: &Session, command: &str, stdin: &[u8], limit: Duration) -> Result<(i32, String, String)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = exec(sess, command, stdin, &mut out, &mut err, Some(limit))?;
    Ok((code, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
}

/// Connects to `t` and runs `script` with `sh -s` (fed on stdin), within
/// `limit`: (status, stdout, stderr).
pub fn run_script(t: &Target, script: &str, limit: Duration) -> Result<(i32, String, String)> {
    let sess = connect(t, Duration::from_secs(10))?;
    output(&sess, "sh -s", script.as_bytes(), limit)
}

/// A word for a POSIX shell command line.
pub fn quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A shell script (fed on stdin, so no value shows on a command line) that
/// sets `env` and runs `argv` from the directory `cwd` when it exists.
pub fn script(env: &[(String, String)], cwd: &Path, argv: &[String]) -> String {
    let mut s = String::new();
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    s.push_str(&format!("cd {} 2>/dev/null || true\n", quote(&cwd.display().to_string())));
    s.push_str(&format!("exec {}\n", argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")));
    s
}

/// `glm-launch --ssh-exec HOST COMMAND...`: OpenMPI's remote-start agent.
/// Runs the command (its words joined by spaces, as ssh does) on HOST and
/// exits with its status (255 when the connection fails, as ssh does).
pub fn agent_main(args: &[String]) -> i32 {
    let Some((host, words)) = args.split_first() else {
        eprintln!("glm-launch --ssh-exec: usage: glm-launch --ssh-exec HOST COMMAND...");
        return 2;
    };
    let command = words.iter().filter(|w| !w.is_empty()).cloned().collect::<Vec<_>>().join(" ");
    let run = || -> Result<i32> {
        let t = resolve(host, &Options::from_env()?)?;
        let sess = connect(&t, Duration::from_secs(30))?;
        exec(&sess, &command, b"", &mut std::io::stdout(), &mut std::io::stderr(), None)
    };
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("glm-launch --ssh-exec: {e:#}");
            255
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "Host node*\n  HostName 10.0.0.%h\n  Port 2200\n  User alice\n  IdentityFile ~/keys/%h-%n\n  UserKnownHostsFile /k/hosts\n  StrictHostKeyChecking accept-new\nHost *\n  Port 22\n  User bob\n";

    /// The same answers from OpenSSH's own reading (`ssh -G`) and from the
    /// parser used without it.
    fn check_resolution(resolve: fn(&str, &Options) -> Result<Target>) {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("config");
        std::fs::write(&cfg, CONFIG).unwrap();
        let opts = Options { config: Some(cfg.clone()), ..Default::default() };
        let t = resolve("node1", &opts).unwrap();
        assert_eq!((t.addr.as_str(), t.port, t.user.as_str()), ("10.0.0.node1", 2200, "alice"));
        // %h is the host after HostName, %n the name given
        assert_eq!(t.identities[0], home().join("keys/10.0.0.node1-node1"));
        assert_eq!(t.known_hosts, vec![PathBuf::from("/k/hosts")]);
        assert!(t.accept_new);
        assert_eq!(t.known_name(), "[10.0.0.node1]:2200");
        let t = resolve("other", &Options { config: Some(cfg.clone()), user: Some("carol".into()), port: Some(2022), ..Default::default() }).unwrap();
        assert_eq!((t.addr.as_str(), t.port, t.user.as_str(), t.accept_new), ("other", 2022, "carol", false));
        assert_eq!(t.known_hosts[0], home().join(".ssh/known_hosts"));
        let jump = d.path().join("jump");
        std::fs::write(&jump, "Host far\n  ProxyJump gate\n").unwrap();
        assert!(resolve("far", &Options { config: Some(jump), ..Default::default() })
            .unwrap_err()
            .to_string()
            .contains("ProxyJump gate, which glm-launch's SSH client does not support"));
    }

    #[test]
    fn ssh_config_through_openssh() {
        let ssh = Path::new("/usr/bin/ssh");
        assert!(ssh.is_file(), "openssh-client (scripts/setup.sh --test installs it)");
        check_resolution(|a, o| resolve_with_ssh(Path::new("/usr/bin/ssh"), a, o));
    }

    #[test]
    fn ssh_config_without_openssh() {
        check_resolution(resolve_with_parser);
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("config");
        std::fs::write(&cfg, "Host a\n  User x\nMatch host b\n  User y\n").unwrap();
        let e = resolve_with_parser("a", &Options { config: Some(cfg.clone()), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:3: `Match host b` needs OpenSSH's own reading", cfg.display())), "{e}");
        assert!(resolve_with_parser("x", &Options { config: Some(d.path().join("missing")), ..Default::default() })
            .unwrap_err()
            .to_string()
            .contains("cannot read the ssh config"));
        let env = Options { config: Some(cfg), user: Some("u".into()), port: Some(7), identity: None, accept_new: true }.to_env();
        assert_eq!(env.len(), 4);
    }

    /// An SSH wire-format public key blob of `kind` with `fill` as its key.
    fn blob(kind: &str, fill: u8) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend((kind.len() as u32).to_be_bytes());
        b.extend(kind.as_bytes());
        b.extend(32u32.to_be_bytes());
        b.extend([fill; 32]);
        b
    }

    #[test]
    fn host_keys_by_exact_name_and_key_type() {
        let sess = Session::new().unwrap();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let (a, b) = (blob("ssh-ed25519", 1), blob("ssh-ed25519", 2));
        let ecdsa = blob("ecdsa-sha2-nistp256", 3);
        let name = "[10.1.2.3]:2222";
        let v = |text: &str, key: &[u8], kind: &str| key_verdict(&sess, text, name, key, kind, &b64(key)).unwrap();
        let file = format!("# comment\n{name} ssh-ed25519 {}\n", b64(&a));
        assert_eq!(v(&file, &a, "ssh-ed25519"), KeyVerdict::Match);
        assert_eq!(v(&file, &b, "ssh-ed25519"), KeyVerdict::Changed);
        // the port-22 entry of the same address says nothing of port 2222
        assert_eq!(v(&format!("10.1.2.3 ssh-ed25519 {}\n", b64(&a)), &b, "ssh-ed25519"), KeyVerdict::Unknown);
        // known by another key type: unknown, not changed
        assert_eq!(v(&format!("{name} ecdsa-sha2-nistp256 {}\n", b64(&ecdsa)), &a, "ssh-ed25519"), KeyVerdict::Unknown);
        assert_eq!(v(&format!("{file}@revoked * ssh-ed25519 {}\n", b64(&a)), &a, "ssh-ed25519"), KeyVerdict::Revoked);
        assert_eq!(v(&format!("@cert-authority * ssh-ed25519 {}\n", b64(&a)), &a, "ssh-ed25519"), KeyVerdict::Unknown);
    }

    #[test]
    fn scripts_quote_every_value() {
        let s = script(&[("A".into(), "it's $HOME".into())], Path::new("/w d"), &["/bin/glm-worker".into(), "env".into()]);
        assert_eq!(s, "export A='it'\\''s $HOME'\ncd '/w d' 2>/dev/null || true\nexec /bin/glm-worker env\n");
    }
}
