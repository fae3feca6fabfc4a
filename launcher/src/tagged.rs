//! OpenMPI's `--tag-output` stream made of whole lines again.
//!
//! mpirun tags what it reads from a rank's pipe chunk by chunk (each chunk
//! starts with `[job,rank]<stderr>:` and every line inside it gets the tag
//! too), not line by line. A line a rank writes in several writes (clap's
//! error, written piece by piece) therefore arrives cut by tags
//! (`error:[1,0]<stderr>: unexpected argument '[1,0]<stderr>:--x...`), and
//! another rank's chunk may stand in the middle of it. `Demux` splits each
//! line at every tag and keeps the unfinished piece of each rank until its
//! newline arrives: out come whole lines, each with its tag once. The tags
//! of each MPI launcher (OpenMPI, MPICH, srun) and one line's parse are here too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};

/// One line of the MPI launcher's output, attributed.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// The rank that wrote it; `None` for the MPI launcher's own messages.
    pub rank: Option<usize>,
    pub stderr: bool,
    pub text: String,
}

/// How the MPI launcher tags each line with its rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tags {
    /// OpenMPI's `--tag-output`: `[job,rank]<stdout>:text`.
    OpenMpi,
    /// MPICH's `-prepend-rank`: `[rank] text`.
    Mpich,
    /// srun's `--label`: `rank: text`, the number right-aligned (stdout and
    /// stderr keep their own streams).
    Srun,
}

/// Parses one line of the launcher's output; lines without its tag are the
/// launcher's own.
pub fn parse_line(raw: &str, from_stderr: bool, tags: Tags) -> Line {
    match tags {
        Tags::OpenMpi | Tags::Mpich => {
            if let Some((tag, after)) = raw.strip_prefix('[').and_then(|r| r.split_once(']')) {
                match (tags, tag.split_once(',')) {
                    // OpenMPI: "1,3" then "<stdout>:" or "<stderr>:"
                    (Tags::OpenMpi, Some((_, r))) => {
                        if let Ok(rank) = r.parse::<usize>() {
                            for (stream, is_err) in [("<stdout>:", false), ("<stderr>:", true)] {
                                if let Some(text) = after.strip_prefix(stream) {
                                    return Line { rank: Some(rank), stderr: is_err, text: text.to_string() };
                                }
                            }
                        }
                    }
                    (Tags::Mpich, None) => {
                        if let Ok(rank) = tag.parse::<usize>() {
                            return Line { rank: Some(rank), stderr: from_stderr, text: after.strip_prefix(' ').unwrap_or(after).to_string() };
                        }
                    }
                    _ => {}
                }
            }
        }
        Tags::Srun => {
            if let Some((num, text)) = raw.trim_start().split_once(": ") {
                if !num.is_empty() && num.len() <= 7 && num.bytes().all(|b| b.is_ascii_digit()) {
                    if let Ok(rank) = num.parse::<usize>() {
                        return Line { rank: Some(rank), stderr: from_stderr, text: text.to_string() };
                    }
                }
            }
        }
    }
    Line { rank: None, stderr: from_stderr, text: raw.to_string() }
}

/// More than this without a newline is passed on as a line anyway.
const MAX_PENDING: usize = 1 << 16;

/// The length of an OpenMPI tag (`[1,0]<stdout>:`, `[12,345]<stderr>:`)
/// at the start of `b`, if one is there.
fn tag_len(b: &[u8]) -> Option<usize> {
    let mut i = 1;
    if b.first() != Some(&b'[') {
        return None;
    }
    for sep in [b',', b']'] {
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start || b.get(i) != Some(&sep) {
            return None;
        }
        i += 1;
    }
    [&b"<stdout>:"[..], b"<stderr>:"].iter().find(|s| b[i..].starts_with(s)).map(|s| i + s.len())
}

/// Reassembles one pipe of OpenMPI's tagged output (see the module).
#[derive(Default)]
pub struct Demux {
    /// The unfinished line of each tag.
    pending: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Demux {
    /// Takes one line as read from the pipe (without its newline); returns
    /// the lines it completes, each `tag + text` (none while the rank's line
    /// is unfinished). A line without a tag is the launcher's own and
    /// passes as it is.
    pub fn push(&mut self, line: &[u8]) -> Vec<Vec<u8>> {
        // (tag, text) pieces; text before the first tag stays untagged
        let mut pieces: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut out = Vec::new();
        let (mut i, mut start) = (0, 0);
        let mut tag: Option<Vec<u8>> = None;
        while i < line.len() {
            match (line[i] == b'[').then(|| tag_len(&line[i..])).flatten() {
                Some(n) => {
                    match tag.take() {
                        Some(t) => pieces.push((t, line[start..i].to_vec())),
                        None if i > 0 => out.push(line[..i].to_vec()),
                        None => {}
                    }
                    tag = Some(line[i..i + n].to_vec());
                    i += n;
                    start = i;
                }
                None => i += 1,
            }
        }
        let Some(last) = tag else {
            out.push(line.to_vec());
            return out;
        };
        // every piece but the last is a rank's line left unfinished at the
        // end of a chunk; the last one ends with this line's newline
        for (t, text) in pieces {
            let p = self.pending.entry(t.clone()).or_default();
            p.extend_from_slice(&text);
            if p.len() > MAX_PENDING {
                let text = std::mem::take(p);
                out.push([t, text].concat());
            }
        }
        let text = [self.pending.remove(&last).unwrap_or_default(), line[start..].to_vec()].concat();
        out.push([last, text].concat());
        out
    }

    /// The unfinished lines at the end of the stream.
    pub fn finish(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.pending).into_iter().filter(|(_, t)| !t.is_empty()).map(|(tag, text)| [tag, text].concat()).collect()
    }

    /// All of `text` (a whole stream) as lines.
    pub fn lines(text: &[u8]) -> Vec<String> {
        let mut d = Demux::default();
        let mut out: Vec<Vec<u8>> = Vec::new();
        for l in text.split(|&b| b == b'\n') {
            out.extend(d.push(l.strip_suffix(b"\r").unwrap_or(l)));
        }
        // the split's last piece is what followed the last newline
        if out.last().is_some_and(|l| l.is_empty()) && text.ends_with(b"\n") {
            out.pop();
        }
        out.extend(d.finish());
        out.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect()
    }
}

/// A reader of the MPI launcher's pipe that yields whole tagged lines
/// (OpenMPI; other launchers' output passes through unchanged).
pub struct Reader<R: Read> {
    inner: BufReader<R>,
    demux: Option<Demux>,
    ready: std::collections::VecDeque<u8>,
    done: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R, tags: Tags) -> Self {
        Reader { inner: BufReader::new(inner), demux: (tags == Tags::OpenMpi).then(Demux::default), ready: Default::default(), done: false }
    }
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(demux) = self.demux.as_mut() else { return self.inner.read(buf) };
        while self.ready.is_empty() && !self.done {
            let mut line = Vec::new();
            if self.inner.read_until(b'\n', &mut line)? == 0 {
                self.done = true;
                for l in demux.finish() {
                    self.ready.extend(l);
                    self.ready.push_back(b'\n');
                }
                break;
            }
            let had_newline = line.last() == Some(&b'\n');
            if had_newline {
                line.pop();
            }
            for l in demux.push(&line) {
                self.ready.extend(l);
                self.ready.push_back(b'\n');
            }
            if !had_newline {
                // the stream ended inside a line
                self.done = true;
                for l in demux.finish() {
                    self.ready.extend(l);
                    self.ready.push_back(b'\n');
                }
            }
        }
        let n = buf.len().min(self.ready.len());
        for (i, b) in self.ready.drain(..n).enumerate() {
            buf[i] = b;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        Demux::lines(s.as_bytes())
    }

    /// clap's error from a real glm-worker rank under `mpirun --tag-output`
    /// (OpenMPI 4.1.4), as it came out of mpirun: its first line in four
    /// chunks.
    const CLAP_CUT: &str = "[1,0]<stderr>:error:[1,0]<stderr>: unexpected argument '[1,0]<stderr>:--bogus-flag[1,0]<stderr>:' found\n\
[1,0]<stderr>:\n\
[1,0]<stderr>:Usage:[1,0]<stderr>: [1,0]<stderr>:glm-worker[1,0]<stderr>: --config <CONFIG> --args <ARGS_FILE>\n\
[1,0]<stderr>:\n\
[1,0]<stderr>:For more information, try '--help'.\n";

    #[test]
    fn a_line_cut_by_tags_is_whole_again() {
        assert_eq!(
            lines(CLAP_CUT),
            [
                "[1,0]<stderr>:error: unexpected argument '--bogus-flag' found",
                "[1,0]<stderr>:",
                "[1,0]<stderr>:Usage: glm-worker --config <CONFIG> --args <ARGS_FILE>",
                "[1,0]<stderr>:",
                "[1,0]<stderr>:For more information, try '--help'."
            ]
        );
    }

    #[test]
    fn another_ranks_chunk_inside_a_line_goes_to_that_rank() {
        // rank 0 wrote "error: " and stalled; rank 1's whole line came next,
        // then the rest of rank 0's
        let got = lines("[1,0]<stderr>:error: [1,1]<stderr>:error: b failed\n[1,0]<stderr>:a failed\n");
        assert_eq!(got, ["[1,1]<stderr>:error: b failed", "[1,0]<stderr>:error: a failed"]);
        // a chunk that ends a line starts with its tag alone
        assert_eq!(lines("[1,2]<stdout>:abc[1,2]<stdout>:\n"), ["[1,2]<stdout>:abc"]);
        // stdout and stderr tags of one rank are apart
        assert_eq!(lines("[1,0]<stdout>:x[1,0]<stderr>:y\n[1,0]<stdout>:z\n"), ["[1,0]<stderr>:y", "[1,0]<stdout>:xz"]);
    }

    #[test]
    fn untagged_lines_and_the_end_of_the_stream() {
        assert_eq!(lines("mpirun noticed that [1,2] is no tag\n[vm:123] MCA\n"), ["mpirun noticed that [1,2] is no tag", "[vm:123] MCA"]);
        // an unfinished line at the end is passed on
        assert_eq!(lines("[1,0]<stdout>:iteration 1\n[1,0]<stdout>:half"), ["[1,0]<stdout>:iteration 1", "[1,0]<stdout>:half"]);
        assert_eq!(lines("[1,0]<stdout>:part[1,1]<stdout>:whole\n"), ["[1,1]<stdout>:whole", "[1,0]<stdout>:part"]);
        // the launcher's text before a tag is its own line
        assert_eq!(lines("----[1,0]<stdout>:x\n"), ["----", "[1,0]<stdout>:x"]);
        assert_eq!(tag_len(b"[1,0]<stdout>:x"), Some(14));
        assert_eq!(tag_len(b"[1,]<stdout>:x"), None);
        assert_eq!(tag_len(b"[1,0]<stdin>:x"), None);
    }

    #[test]
    fn the_reader_yields_whole_lines_and_passes_other_launchers_through() {
        let mut out = String::new();
        Reader::new(CLAP_CUT.as_bytes(), Tags::OpenMpi).read_to_string(&mut out).unwrap();
        assert!(out.starts_with("[1,0]<stderr>:error: unexpected argument '--bogus-flag' found\n[1,0]<stderr>:\n"), "{out}");
        assert_eq!(out.lines().count(), 5);
        // bytes that are not UTF-8 pass unchanged
        let mut b = Vec::new();
        Reader::new(&b"[1,0]<stdout>:caf\xff[1,0]<stdout>: au lait\n"[..], Tags::OpenMpi).read_to_end(&mut b).unwrap();
        assert_eq!(b, b"[1,0]<stdout>:caf\xff au lait\n");
        let mut s = String::new();
        Reader::new(&b"[1,0]<stdout>:a[1,0]<stdout>:b\n"[..], Tags::Srun).read_to_string(&mut s).unwrap();
        assert_eq!(s, "[1,0]<stdout>:a[1,0]<stdout>:b\n");
    }
}
