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

fn expand(p: &str, alias: &str, user: &str) -> PathBuf {
    let p = p.replace("%h", alias).replace("%r", user).replace("%%", "%");
    match p.strip_prefix("~/") {
        Some(rest) => home().join(rest),
        None => PathBuf::from(p),
    }
}

fn login_name() -> String {
    if let Some(u) = std::env::var("USER").ok().filter(|u| !u.is_empty()) {
        return u;
    }
    // SAFETY: getpwuid returns a pointer to static storage or null; read at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned();
        }
    }
    "root".into()
}

/// Resolves `alias` as OpenSSH would: command line, then the config file's
/// first matching values, then defaults.
pub fn resolve(alias: &str, opts: &Options) -> Result<Target> {
    let default_config = home().join(".ssh/config");
    let config_path = opts.config.clone().or_else(|| default_config.is_file().then_some(default_config));
    let params = match &config_path {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("{}: cannot read the ssh config", p.display()))?;
            let rules = ssh2_config::ParseRule::ALLOW_UNKNOWN_FIELDS | ssh2_config::ParseRule::ALLOW_UNSUPPORTED_FIELDS;
            let cfg = ssh2_config::SshConfig::default()
                .parse(&mut std::io::BufReader::new(f), rules)
                .map_err(|e| anyhow!("{}: {e}", p.display()))?;
            Some(cfg.query(alias))
        }
        None => None,
    };
    let field = |name: &str| -> Option<Vec<String>> {
        let p = params.as_ref()?;
        p.unsupported_fields.iter().chain(p.ignored_fields.iter()).find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    };
    let user = opts.user.clone().or_else(|| params.as_ref().and_then(|p| p.user.clone())).unwrap_or_else(login_name);
    let addr = params.as_ref().and_then(|p| p.host_name.clone()).map_or_else(|| alias.to_string(), |h| h.replace("%h", alias));
    let port = opts.port.or_else(|| params.as_ref().and_then(|p| p.port)).unwrap_or(22);
    let mut identities: Vec<PathBuf> = opts.identity.iter().cloned().collect();
    match params.as_ref().and_then(|p| p.identity_file.clone()) {
        Some(files) => identities.extend(files.iter().map(|f| expand(&f.to_string_lossy(), alias, &user))),
        None => identities.extend(["id_ed25519", "id_ecdsa", "id_rsa"].iter().map(|n| home().join(".ssh").join(n)).filter(|p| p.is_file())),
    }
    let known_hosts = match field("userknownhostsfile") {
        Some(files) => files.iter().map(|f| expand(f, alias, &user)).collect(),
        None => vec![home().join(".ssh/known_hosts"), home().join(".ssh/known_hosts2")],
    };
    let strict = field("stricthostkeychecking").and_then(|v| v.first().cloned()).unwrap_or_default().to_lowercase();
    let accept_new = opts.accept_new || strict == "accept-new" || strict == "no" || strict == "off";
    Ok(Target { alias: alias.to_string(), addr, port, user, identities, known_hosts, accept_new })
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

/// Checks the server's host key against the target's known_hosts files;
/// an unknown key is added to the first one when the user opted in.
fn verify_host_key(sess: &Session, t: &Target) -> Result<()> {
    let (key, kind) = sess.host_key().ok_or_else(|| anyhow!("{}: the server sent no host key", t.describe()))?;
    let fingerprint = sess.host_key_hash(HashType::Sha256).map(|h| format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(h))).unwrap_or_default();
    let mut kh = sess.known_hosts()?;
    let mut read = Vec::new();
    for f in t.known_hosts.iter().map(PathBuf::as_path).chain([Path::new("/etc/ssh/ssh_known_hosts")]) {
        if f.is_file() {
            kh.read_file(f, KnownHostFileKind::OpenSSH).map_err(|e| anyhow!("{}: cannot read known hosts: {e}", f.display()))?;
            read.push(f.display().to_string());
        }
    }
    let files = if read.is_empty() { "no known_hosts file".to_string() } else { read.join(", ") };
    match kh.check_port(&t.addr, t.port, key) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch => bail!(
            "{}: HOST KEY CHANGED: the server's {} key {fingerprint} differs from the one in {files}; refusing to connect (someone may be intercepting the connection; if the host was reinstalled, remove the old key with `ssh-keygen -R '{}'`)",
            t.describe(),
            key_name(kind),
            t.known_name()
        ),
        CheckResult::NotFound if t.accept_new => {
            let file = t.known_hosts.first().ok_or_else(|| anyhow!("{}: no known_hosts file to add the new key to", t.describe()))?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
            }
            let line = format!("{} {} {}\n", t.known_name(), key_name(kind), base64::engine::general_purpose::STANDARD.encode(key));
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).with_context(|| format!("{}: cannot add the host key", file.display()))?;
            f.write_all(line.as_bytes()).with_context(|| format!("{}: cannot add the host key", file.display()))?;
            eprintln!("glm-launch: {}: added its {} key {fingerprint} to {} (--ssh_accept_new_host_keys)", t.describe(), key_name(kind), file.display());
            Ok(())
        }
        CheckResult::NotFound => bail!(
            "{}: unknown host key ({} {fingerprint}), not in {files}; refusing to connect: check the fingerprint and add it (`ssh-keyscan -p {} {} >> ~/.ssh/known_hosts`), or pass --ssh_accept_new_host_keys",
            t.describe(),
            key_name(kind),
            t.port,
            t.addr
        ),
        CheckResult::Failure => bail!("{}: the host key could not be checked against {files}", t.describe()),
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
        let tried = if tried.is_empty() { "no key found (ssh-agent, --ssh_identity, IdentityFile, ~/.ssh/id_*)".to_string() } else { format!("tried {}", tried.join(", ")) };
        bail!("{}: login as {} refused: {tried}", t.describe(), t.user);
    }
    sess.set_timeout(0);
    Ok(sess)
}

/// Runs `command` on the host (with `stdin` fed to it), passing its output
/// on as it arrives; returns its exit status.
pub fn exec(sess: &Session, command: &str, stdin: &[u8], out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
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
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })();
    sess.set_blocking(true);
    result?;
    ch.wait_close()?;
    Ok(ch.exit_status()?)
}

/// Runs `command` and collects its output: (status, stdout, stderr).
pub fn output(sess: &Session, command: &str, stdin: &[u8]) -> Result<(i32, String, String)> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = exec(sess, command, stdin, &mut out, &mut err)?;
    Ok((code, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned()))
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
        exec(&sess, &command, b"", &mut std::io::stdout(), &mut std::io::stderr())
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

    #[test]
    fn config_then_defaults_with_the_command_line_first() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("config");
        std::fs::write(
            &cfg,
            "Host node*\n  HostName 10.0.0.%h\n  Port 2200\n  User alice\n  IdentityFile ~/keys/%h\n  UserKnownHostsFile /k/hosts\n  StrictHostKeyChecking accept-new\nHost *\n  Port 22\n  User bob\n",
        )
        .unwrap();
        let opts = Options { config: Some(cfg.clone()), ..Default::default() };
        let t = resolve("node1", &opts).unwrap();
        assert_eq!((t.addr.as_str(), t.port, t.user.as_str()), ("10.0.0.node1", 2200, "alice"));
        assert_eq!(t.identities, vec![home().join("keys/node1")]);
        assert_eq!(t.known_hosts, vec![PathBuf::from("/k/hosts")]);
        assert!(t.accept_new);
        assert_eq!(t.known_name(), "[10.0.0.node1]:2200");
        let t = resolve("other", &Options { config: Some(cfg.clone()), user: Some("carol".into()), port: Some(2022), ..Default::default() }).unwrap();
        assert_eq!((t.addr.as_str(), t.port, t.user.as_str(), t.accept_new), ("other", 2022, "carol", false));
        assert_eq!(t.known_hosts[0], home().join(".ssh/known_hosts"));
        let env = Options { config: Some(cfg), user: Some("u".into()), port: Some(7), identity: None, accept_new: true }.to_env();
        assert_eq!(env.len(), 4);
        assert!(resolve("x", &Options { config: Some(d.path().join("missing")), ..Default::default() }).unwrap_err().to_string().contains("cannot read the ssh config"));
    }

    #[test]
    fn scripts_quote_every_value() {
        let s = script(&[("A".into(), "it's $HOME".into())], Path::new("/w d"), &["/bin/glm-worker".into(), "env".into()]);
        assert_eq!(s, "export A='it'\\''s $HOME'\ncd '/w d' 2>/dev/null || true\nexec /bin/glm-worker env\n");
    }
}
