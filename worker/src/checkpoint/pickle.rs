//! Python pickles without Python: a reader that builds the value tree of a
//! pickle and never calls anything, and the few opcodes a writer needs.
//!
//! PyTorch's files (`torch.save`) are pickles of dicts of tensors that may
//! also hold objects of classes this program has no use for (an argparse
//! `Namespace`, numpy's random state, optimizer state). The reader keeps a
//! class reference (`GLOBAL`) as its module and name, a call (`REDUCE`,
//! `NEWOBJ`) as the callable and its arguments, and what `BUILD`,
//! `SETITEMS` and `APPENDS` add to an object as its state and items, so the
//! caller interprets the patterns it knows (`torch._utils._rebuild_tensor_v2`
//! with a persistent storage id, `collections.OrderedDict`, a `Namespace`'s
//! attributes) and ignores the rest. Values live in an arena and the memo
//! holds their ids, so a value fetched twice is one value, as in Python.
//! The opcodes of protocols 0 to 5 that build plain values are read; those
//! that name classes by other means (`INST`, `OBJ`, the extension registry)
//! and out-of-band buffers are refused with their name and offset.

/// A value's index in the arena.
pub type Id = usize;

#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond 64 bits (little-endian two's complement).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    /// A class or function by its module and name (never imported).
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ),
    /// never called, with the state BUILD gave it and what SETITEM(S) and
    /// APPEND(S) added to it (an `OrderedDict`'s entries).
    Object {
        callable: Id,
        args: Id,
        state: Option<Id>,
        items: Vec<(Id, Id)>,
        appended: Vec<Id>,
    },
    /// A persistent id (`BINPERSID`): torch's reference to a tensor storage.
    Persistent(Id),
}

/// A parsed pickle: the arena and the root value.
#[derive(Debug)]
pub struct Pickle {
    nodes: Vec<Node>,
    pub root: Id,
}

/// The value stack: values, and marks (`MARK`) as the stack's length then.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u64, Id>,
}

/// The names of the opcodes this reader refuses, for the error.
fn refused(op: u8) -> Option<&'static str> {
    Some(match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x92 => "NEWOBJ_EX with keyword arguments",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

impl<'a> Machine<'a> {
    fn err<T>(&self, at: usize, msg: impl std::fmt::Display) -> Result<T, String> {
        Err(format!("pickle byte {at}: {msg}"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.data.len() - self.pos {
            return self.err(self.pos, format!("truncated ({n} bytes wanted, {} left)", self.data.len() - self.pos));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A length that must fit in what is left of the data.
    fn len(&mut self, n: u64) -> Result<usize, String> {
        if n > (self.data.len() - self.pos) as u64 {
            return self.err(self.pos, format!("truncated (a length of {n} bytes, {} left)", self.data.len() - self.pos));
        }
        Ok(n as usize)
    }

    /// A text argument up to the newline (protocol 0).
    fn line(&mut self) -> Result<&'a str, String> {
        let start = self.pos;
        let Some(end) = self.data[start..].iter().position(|&b| b == b'\n') else {
            return self.err(start, "truncated (no end of line)");
        };
        self.pos = start + end + 1;
        std::str::from_utf8(&self.data[start..start + end]).or_else(|_| self.err(start, "a text argument that is not UTF-8"))
    }

    fn utf8(&mut self, n: usize) -> Result<String, String> {
        let at = self.pos;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).or_else(|_| self.err(at, "a string that is not UTF-8"))
    }

    fn push(&mut self, n: Node) {
        self.nodes.push(n);
        self.stack.push(self.nodes.len() - 1);
    }

    fn pop(&mut self, at: usize) -> Result<Id, String> {
        if self.stack.len() <= self.marks.last().copied().unwrap_or(0) {
            return self.err(at, "stack underflow");
        }
        Ok(self.stack.pop().expect("checked"))
    }

    fn top(&self, at: usize) -> Result<Id, String> {
        match self.stack.last() {
            Some(&id) if self.stack.len() > self.marks.last().copied().unwrap_or(0) => Ok(id),
            _ => self.err(at, "stack underflow"),
        }
    }

    /// The values above the last mark, which goes.
    fn pop_mark(&mut self, at: usize) -> Result<Vec<Id>, String> {
        let Some(m) = self.marks.pop() else { return self.err(at, "no MARK") };
        Ok(self.stack.split_off(m))
    }

    fn pairs(&self, at: usize, items: Vec<Id>) -> Result<Vec<(Id, Id)>, String> {
        if items.len() % 2 != 0 {
            return self.err(at, "an odd number of values for key/value pairs");
        }
        Ok(items.chunks(2).map(|c| (c[0], c[1])).collect())
    }

    /// Adds key/value pairs to the dict (or object) `target`.
    fn set_items(&mut self, at: usize, target: Id, pairs: Vec<(Id, Id)>) -> Result<(), String> {
        match &mut self.nodes[target] {
            Node::Dict(d) => d.extend(pairs),
            Node::Object { items, .. } => items.extend(pairs),
            other => return Err(format!("pickle byte {at}: SETITEM(S) on {}", kind(other))),
        }
        Ok(())
    }

    fn append_items(&mut self, at: usize, target: Id, values: Vec<Id>) -> Result<(), String> {
        match &mut self.nodes[target] {
            Node::List(l) => l.extend(values),
            Node::Set(s) => s.extend(values),
            Node::Object { appended, .. } => appended.extend(values),
            other => return Err(format!("pickle byte {at}: APPEND(S)/ADDITEMS on {}", kind(other))),
        }
        Ok(())
    }

    fn memo_put(&mut self, at: usize, key: u64) -> Result<(), String> {
        let id = self.top(at)?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, at: usize, key: u64) -> Result<(), String> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.err(at, format!("memo entry {key} was never stored")),
        }
    }

    fn int_node(bytes: &[u8]) -> Node {
        if bytes.len() > 8 {
            // beyond i64 unless it is a sign extension
            let (lo, hi) = bytes.split_at(8);
            let sign = if lo[7] & 0x80 != 0 { 0xff } else { 0 };
            if hi.iter().any(|&b| b != sign) {
                return Node::BigInt(bytes.to_vec());
            }
            return Self::int_node(lo);
        }
        if bytes.is_empty() {
            return Node::Int(0);
        }
        let fill = if bytes[bytes.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        let mut b = [fill; 8];
        b[..bytes.len()].copy_from_slice(bytes);
        Node::Int(i64::from_le_bytes(b))
    }

    fn run(mut self) -> Result<Pickle, String> {
        loop {
            let at = self.pos;
            let op = self.u8().or_else(|_| self.err(at, "truncated (no STOP)"))?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.err(at, format!("pickle protocol {v} (this reader knows 0 to 5)"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a hint
                }
                b'.' => {
                    let root = self.pop(at)?;
                    return Ok(Pickle { nodes: self.nodes, root });
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop(at)?;
                }
                b'1' => {
                    self.pop_mark(at)?;
                }
                b'2' => {
                    let id = self.top(at)?;
                    self.stack.push(id);
                }
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Node::Int(v.into()))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v.into()))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Node::Int(v.into()))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as u64 } else { self.u32()? as u64 };
                    let n = self.len(n)?;
                    let bytes = self.take(n)?;
                    let node = Self::int_node(bytes);
                    self.push(node)
                }
                b'I' | b'L' => {
                    let s = self.line()?;
                    let node = match s {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        _ => match s.trim_end_matches('L').parse::<i64>() {
                            Ok(v) => Node::Int(v),
                            Err(_) => return self.err(at, format!("an integer {s:?} this reader cannot hold")),
                        },
                    };
                    self.push(node)
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.push(Node::Float(v))
                }
                b'F' => {
                    let s = self.line()?;
                    let v = s.parse::<f64>().or_else(|_| self.err(at, format!("a float {s:?}")))?;
                    self.push(Node::Float(v))
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let s = self.utf8(n)?;
                    self.push(Node::Str(s))
                }
                b'V' => {
                    // raw-unicode-escape: plain text but for \uXXXX escapes, kept as written
                    let s = self.line()?.to_string();
                    self.push(Node::Str(s))
                }
                b'T' | b'U' => {
                    // Python 2 str: bytes, read as Latin-1 (torch.load's default encoding)
                    let n = if op == b'T' { self.u32()? as u64 } else { self.u8()? as u64 };
                    let n = self.len(n)?;
                    let s = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.push(Node::Str(s))
                }
                b'S' => {
                    let s = self.line()?;
                    let s = s.trim_matches(|c| c == '\'' || c == '"').to_string();
                    self.push(Node::Str(s))
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b))
                }
                b')' => self.push(Node::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at)?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))
                }
                b']' => self.push(Node::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::List(items))
                }
                b'a' => {
                    let v = self.pop(at)?;
                    let target = self.top(at)?;
                    self.append_items(at, target, vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark(at)?;
                    let target = self.top(at)?;
                    self.append_items(at, target, items)?;
                }
                b'}' => self.push(Node::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark(at)?;
                    let pairs = self.pairs(at, items)?;
                    self.push(Node::Dict(pairs))
                }
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    let target = self.top(at)?;
                    self.set_items(at, target, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark(at)?;
                    let pairs = self.pairs(at, items)?;
                    let target = self.top(at)?;
                    self.set_items(at, target, pairs)?;
                }
                0x8f => self.push(Node::Set(Vec::new())),
                0x91 => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::Set(items))
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(Node::Global { module, name })
                }
                0x93 => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    let (Node::Str(module), Node::Str(name)) = (&self.nodes[module], &self.nodes[name]) else {
                        return self.err(at, "STACK_GLOBAL without a module and a name");
                    };
                    let (module, name) = (module.clone(), name.clone());
                    self.push(Node::Global { module, name })
                }
                b'R' | 0x81 => {
                    let args = self.pop(at)?;
                    let callable = self.pop(at)?;
                    self.push(Node::Object { callable, args, state: None, items: Vec::new(), appended: Vec::new() })
                }
                0x92 => {
                    let kwargs = self.pop(at)?;
                    let args = self.pop(at)?;
                    let callable = self.pop(at)?;
                    if !matches!(&self.nodes[kwargs], Node::Dict(d) if d.is_empty()) {
                        return self.err(at, "unsupported opcode NEWOBJ_EX with keyword arguments");
                    }
                    self.push(Node::Object { callable, args, state: None, items: Vec::new(), appended: Vec::new() })
                }
                b'b' => {
                    let s = self.pop(at)?;
                    let target = self.top(at)?;
                    match &mut self.nodes[target] {
                        Node::Object { state, .. } => *state = Some(s),
                        other => return Err(format!("pickle byte {at}: BUILD on {}", kind(other))),
                    }
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    self.push(Node::Persistent(pid))
                }
                b'P' => {
                    let s = self.line()?.to_string();
                    self.nodes.push(Node::Str(s));
                    let pid = self.nodes.len() - 1;
                    self.push(Node::Persistent(pid))
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(at, k)?
                }
                b'r' => {
                    let k = self.u32()? as u64;
                    self.memo_put(at, k)?
                }
                b'p' => {
                    let s = self.line()?;
                    let k = s.parse::<u64>().or_else(|_| self.err(at, format!("a memo key {s:?}")))?;
                    self.memo_put(at, k)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(at, k)?
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(at, k)?
                }
                b'j' => {
                    let k = self.u32()? as u64;
                    self.memo_get(at, k)?
                }
                b'g' => {
                    let s = self.line()?;
                    let k = s.parse::<u64>().or_else(|_| self.err(at, format!("a memo key {s:?}")))?;
                    self.memo_get(at, k)?
                }
                _ => {
                    return match refused(op) {
                        Some(name) => self.err(at, format!("unsupported pickle opcode {name} (0x{op:02x})")),
                        None => self.err(at, format!("unknown pickle opcode 0x{op:02x} (not a pickle, or a damaged one)")),
                    };
                }
            }
        }
    }
}

/// What a node is, in words, for errors.
fn kind(n: &Node) -> &'static str {
    match n {
        Node::None => "None",
        Node::Bool(_) => "a bool",
        Node::Int(_) | Node::BigInt(_) => "an int",
        Node::Float(_) => "a float",
        Node::Str(_) => "a str",
        Node::Bytes(_) => "bytes",
        Node::Tuple(_) => "a tuple",
        Node::List(_) => "a list",
        Node::Dict(_) => "a dict",
        Node::Set(_) => "a set",
        Node::Global { .. } => "a class or function",
        Node::Object { .. } => "an object",
        Node::Persistent(_) => "a persistent id",
    }
}

/// Parses a pickle; the error names the byte offset.
pub fn parse(data: &[u8]) -> Result<Pickle, String> {
    Machine { data, pos: 0, nodes: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: Default::default() }.run()
}

impl Pickle {
    pub fn node(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    /// `module.name` of a class or function, or of the callable of an object.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match &self.nodes[id] {
            Node::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The key/value pairs of a dict or an `OrderedDict`.
    pub fn dict(&self, id: Id) -> Option<&[(Id, Id)]> {
        match &self.nodes[id] {
            Node::Dict(d) => Some(d),
            Node::Object { callable, items, .. } if self.global(*callable) == Some(("collections", "OrderedDict")) => Some(items),
            _ => None,
        }
    }

    /// The value under string key `key` of a dict.
    pub fn get(&self, dict: Id, key: &str) -> Option<Id> {
        self.dict(dict)?.iter().find(|(k, _)| self.str(*k) == Some(key)).map(|(_, v)| *v)
    }

    pub fn str(&self, id: Id) -> Option<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self, id: Id) -> Option<i64> {
        match &self.nodes[id] {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn seq(&self, id: Id) -> Option<&[Id]> {
        match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    /// An object's callable (`module.name`) and arguments.
    pub fn call(&self, id: Id) -> Option<((&str, &str), Id)> {
        match &self.nodes[id] {
            Node::Object { callable, args, .. } => Some((self.global(*callable)?, *args)),
            _ => None,
        }
    }

    /// The state BUILD gave an object.
    pub fn state(&self, id: Id) -> Option<Id> {
        match &self.nodes[id] {
            Node::Object { state, .. } => *state,
            _ => None,
        }
    }

    /// A plain value (None, bool, number, str, and lists and str-keyed
    /// dicts of them) as JSON; `None` for anything else (objects, bytes,
    /// tensors), which a caller skips.
    pub fn to_json(&self, id: Id) -> Option<serde_json::Value> {
        self.json_at(id, 0)
    }

    fn json_at(&self, id: Id, depth: usize) -> Option<serde_json::Value> {
        use serde_json::Value;
        if depth > 16 {
            return None;
        }
        Some(match &self.nodes[id] {
            Node::None => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(v) => Value::from(*v),
            Node::Float(v) => serde_json::Number::from_f64(*v).map(Value::Number)?,
            Node::Str(s) => Value::String(s.clone()),
            Node::Tuple(v) | Node::List(v) => Value::Array(v.iter().map(|&i| self.json_at(i, depth + 1)).collect::<Option<_>>()?),
            Node::Dict(_) | Node::Object { .. } => {
                let d = self.dict(id)?;
                let mut m = serde_json::Map::new();
                for (k, v) in d {
                    m.insert(self.str(*k)?.to_string(), self.json_at(*v, depth + 1)?);
                }
                Value::Object(m)
            }
            _ => return None,
        })
    }

    /// What a value is, in words: its kind, or an object's class.
    pub fn describe(&self, id: Id) -> String {
        match &self.nodes[id] {
            Node::Object { callable, .. } => match self.global(*callable) {
                Some((m, n)) => format!("a {m}.{n} object"),
                None => "an object".into(),
            },
            Node::Global { module, name } => format!("the class or function {module}.{name}"),
            n => kind(n).into(),
        }
    }
}

/// Writes the opcodes of protocol 2 a dict of tensors and plain values
/// needs (what `torch.save` writes, and nothing `torch.load`'s
/// `weights_only` unpickler refuses).
#[derive(Default)]
pub struct Writer {
    pub out: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Writer { out: vec![0x80, 2] }
    }

    pub fn stop(&mut self) {
        self.out.push(b'.');
    }

    pub fn mark(&mut self) {
        self.out.push(b'(');
    }

    pub fn none(&mut self) {
        self.out.push(b'N');
    }

    pub fn bool(&mut self, b: bool) {
        self.out.push(if b { 0x88 } else { 0x89 });
    }

    pub fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.out.extend([b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend((v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend((v as i32).to_le_bytes());
        } else {
            // LONG1: the shortest little-endian two's complement
            let b = v.to_le_bytes();
            let mut n = 8;
            while n > 1 && ((b[n - 1] == 0 && b[n - 2] & 0x80 == 0) || (b[n - 1] == 0xff && b[n - 2] & 0x80 != 0)) {
                n -= 1;
            }
            self.out.extend([0x8a, n as u8]);
            self.out.extend(&b[..n]);
        }
    }

    pub fn float(&mut self, v: f64) {
        self.out.push(b'G');
        self.out.extend(v.to_be_bytes());
    }

    pub fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    pub fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend(format!("{module}\n{name}\n").as_bytes());
    }

    pub fn empty_tuple(&mut self) {
        self.out.push(b')');
    }

    /// TUPLE: the values since the last mark.
    pub fn tuple(&mut self) {
        self.out.push(b't');
    }

    pub fn empty_list(&mut self) {
        self.out.push(b']');
    }

    /// APPENDS: the values since the last mark onto the list below it.
    pub fn appends(&mut self) {
        self.out.push(b'e');
    }

    pub fn empty_dict(&mut self) {
        self.out.push(b'}');
    }

    /// SETITEMS: the key/value pairs since the last mark into the dict below it.
    pub fn setitems(&mut self) {
        self.out.push(b'u');
    }

    pub fn reduce(&mut self) {
        self.out.push(b'R');
    }

    pub fn binpersid(&mut self) {
        self.out.push(b'Q');
    }

    /// `collections.OrderedDict()` (its items follow with MARK ... SETITEMS).
    pub fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.empty_tuple();
        self.reduce();
    }

    /// A JSON value as Python's: null, bools, numbers, strings, lists, dicts.
    pub fn json(&mut self, v: &serde_json::Value) {
        use serde_json::Value;
        match v {
            Value::Null => self.none(),
            Value::Bool(b) => self.bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => self.int(i),
                None => self.float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => self.str(s),
            Value::Array(a) => {
                self.empty_list();
                if !a.is_empty() {
                    self.mark();
                    for x in a {
                        self.json(x);
                    }
                    self.appends();
                }
            }
            Value::Object(m) => {
                self.empty_dict();
                if !m.is_empty() {
                    self.mark();
                    for (k, x) in m {
                        self.str(k);
                        self.json(x);
                    }
                    self.setitems();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protocol 2 as CPython writes it: `{'a': [1, -2, 3.5, 'x', None, True], 'b': (70000, 2**40, -2**70)}`
    /// plus a memo reference to the list, an OrderedDict with BUILD state
    /// and an object whose class is never imported.
    #[test]
    fn reads_plain_values_objects_and_memo_references() {
        let mut w = Writer::new();
        w.empty_dict();
        w.out.extend([b'q', 0]);
        w.mark();
        w.str("a");
        w.empty_list();
        w.out.extend([b'q', 1]);
        w.mark();
        for v in [1i64, -2] {
            w.int(v);
        }
        w.float(3.5);
        w.str("x");
        w.none();
        w.bool(true);
        w.appends();
        w.str("b");
        w.int(70000);
        w.int(1 << 40);
        // -2**70 as LONG1 (9 bytes)
        w.out.extend([0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0xc0]);
        w.out.push(0x87);
        w.str("again");
        w.out.extend([b'h', 1]);
        w.str("od");
        w.ordered_dict();
        w.mark();
        w.str("k");
        w.int(5);
        w.setitems();
        w.empty_dict();
        w.str("_metadata");
        w.int(1);
        w.out.push(b's');
        w.out.push(b'b');
        w.str("ns");
        w.global("argparse", "Namespace");
        w.empty_tuple();
        w.out.push(0x81);
        w.empty_dict();
        w.mark();
        w.str("num_layers");
        w.int(2);
        w.setitems();
        w.out.push(b'b');
        w.setitems();
        w.stop();
        let p = parse(&w.out).unwrap();
        let a = p.get(p.root, "a").unwrap();
        assert_eq!(p.to_json(a).unwrap(), serde_json::json!([1, -2, 3.5, "x", null, true]));
        assert_eq!(p.get(p.root, "again"), Some(a), "the memo refers to the same value");
        let b = p.seq(p.get(p.root, "b").unwrap()).unwrap().to_vec();
        assert_eq!(p.int(b[0]), Some(70000));
        assert_eq!(p.int(b[1]), Some(1 << 40));
        assert!(matches!(p.node(b[2]), Node::BigInt(_)));
        let od = p.get(p.root, "od").unwrap();
        assert_eq!(p.int(p.get(od, "k").unwrap()), Some(5));
        assert!(p.state(od).is_some());
        let ns = p.get(p.root, "ns").unwrap();
        assert_eq!(p.describe(ns), "a argparse.Namespace object");
        assert_eq!(p.call(ns).unwrap().0, ("argparse", "Namespace"));
        assert_eq!(p.to_json(p.state(ns).unwrap()).unwrap(), serde_json::json!({"num_layers": 2}));
    }

    #[test]
    fn small_ints_round_trip_through_every_width() {
        for v in [0i64, 255, 256, 65535, 65536, -1, i32::MIN as i64, i32::MAX as i64 + 1, -(1 << 40), i64::MAX, i64::MIN] {
            let mut w = Writer::new();
            w.int(v);
            w.stop();
            let p = parse(&w.out).unwrap();
            assert_eq!(p.int(p.root), Some(v), "{v}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_read_naming_the_offset() {
        let e = parse(&[0x80, 2, b'(', b'i', b'x', b'\n', b'y', b'\n', b'.']).unwrap_err();
        assert!(e.contains("byte 3") && e.contains("INST"), "{e}");
        let e = parse(&[0x80, 2, b'X', 10, 0, 0, 0, b'a']).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let e = parse(&[0x80, 2, 0xff]).unwrap_err();
        assert!(e.contains("unknown pickle opcode 0xff"), "{e}");
        let e = parse(&[0x80, 2, b'h', 3, b'.']).unwrap_err();
        assert!(e.contains("memo entry 3"), "{e}");
        let e = parse(&[0x80, 2, b'N']).unwrap_err();
        assert!(e.contains("no STOP"), "{e}");
        let e = parse(&[0x80, 2, b'u', b'.']).unwrap_err();
        assert!(e.contains("no MARK"), "{e}");
    }
}
