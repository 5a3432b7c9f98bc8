//! The data set and the commands, with the replies `redis-server` 7.0 gives.
//!
//! ```text
//!  args ─▶ lookup (case-insensitive) ─▶ arity check ─▶ maxmemory check (writes that grow)
//!       ─▶ run ─▶ reply bytes appended to `out`
//!                 └─ Outcome { log: the request changed the data set → append it to the log
//!                              before the reply is released; close: QUIT }
//! ```
//!
//! | command | reply |
//! |---|---|
//! | `PING [msg]`, `ECHO msg` | `+PONG` / bulk |
//! | `SET k v [NX\|XX] [GET] [KEEPTTL]` | `+OK`, nil when NX/XX refused, the old value with GET |
//! | `GET k`, `MSET k v …`, `DEL k …`, `EXISTS k …`, `INCR k` | bulk/nil, `+OK`, `:n` |
//! | `LPUSH/RPUSH k v …`, `LPOP/RPOP k [n]`, `LRANGE k a b`, `LLEN k` | `:len`, bulk/array, array, `:n` |
//! | `DBSIZE`, `FLUSHALL [SYNC\|ASYNC]`, `SELECT 0`, `QUIT` | `:n`, `+OK` |
//! | `CONFIG GET pattern …`, `COMMAND [COUNT\|DOCS]`, `INFO [section]` | what clients need to start |
//!
//! Keys never expire: SET's EX/PX/EXAT/PXAT options get `-ERR syntax error`. Anything else gets
//! Redis's `-ERR unknown command …`.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::resp::{string_to_i64, Reply};

/// A value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A string.
    Str(Vec<u8>),
    /// A list.
    List(VecDeque<Vec<u8>>),
}

/// What the engine needs to know about the server for INFO.
#[derive(Clone, Debug, Default)]
pub struct ServerInfo {
    /// Open client connections.
    pub clients: u64,
    /// Seconds since the server started.
    pub uptime_s: u64,
    /// The TCP port.
    pub port: u16,
    /// Requests answered since the start.
    pub commands: u64,
    /// Log bytes (the append-only file's size).
    pub aof_bytes: u64,
}

/// What a request did besides its reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// It changed the data set: log it (and flush the log) before its reply goes out.
    pub log: bool,
    /// Close the connection after the reply (QUIT).
    pub close: bool,
}

/// Bytes counted per key and per list element besides their data.
const KEY_OVERHEAD: usize = 64;
const ELEM_OVERHEAD: usize = 32;

const WRONGTYPE: &[u8] = b"WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INT: &[u8] = b"ERR value is not an integer or out of range";
const SYNTAX: &[u8] = b"ERR syntax error";
const OOM: &[u8] = b"OOM command not allowed when used memory > 'maxmemory'.";

/// A command: name, arity (Redis's convention: n = exactly n, -n = at least n), whether it
/// writes, whether it may grow memory.
struct Cmd {
    name: &'static str,
    arity: i32,
    write: bool,
    grows: bool,
}

const COMMANDS: &[Cmd] = &[
    cmd("ping", -1, false, false),
    cmd("echo", 2, false, false),
    cmd("set", -3, true, true),
    cmd("get", 2, false, false),
    cmd("mset", -3, true, true),
    cmd("del", -2, true, false),
    cmd("exists", -2, false, false),
    cmd("incr", 2, true, true),
    cmd("lpush", -3, true, true),
    cmd("rpush", -3, true, true),
    cmd("lpop", -2, true, false),
    cmd("rpop", -2, true, false),
    cmd("lrange", 4, false, false),
    cmd("llen", 2, false, false),
    cmd("dbsize", 1, false, false),
    cmd("flushall", -1, true, false),
    cmd("select", 2, false, false),
    cmd("quit", -1, false, false),
    cmd("config", -2, false, false),
    cmd("command", -1, false, false),
    cmd("info", -1, false, false),
];

const fn cmd(name: &'static str, arity: i32, write: bool, grows: bool) -> Cmd {
    Cmd {
        name,
        arity,
        write,
        grows,
    }
}

/// The configuration CONFIG GET reports.
const CONFIG: &[(&str, &str)] = &[
    ("appendonly", "yes"),
    ("appendfsync", "always"),
    ("save", ""),
    ("databases", "1"),
    ("port", "6379"),
];

/// The data set.
#[derive(Debug)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Value>,
    used: usize,
    maxmemory: usize,
}

fn lower(s: &[u8]) -> String {
    s.iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect()
}

fn str_len(v: &Value) -> usize {
    match v {
        Value::Str(s) => s.len(),
        Value::List(l) => l.iter().map(|e| e.len() + ELEM_OVERHEAD).sum(),
    }
}

/// Redis's `%.Ns` of possibly binary bytes: at most `n` bytes, cut at a NUL.
fn c_str(s: &[u8], n: usize) -> &[u8] {
    let s = &s[..s.len().min(n)];
    match s.iter().position(|&b| b == 0) {
        Some(z) => &s[..z],
        None => s,
    }
}

/// Glob match with `*` and `?` (enough for CONFIG GET).
fn glob(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && glob(rest, &s[1..]),
        Some((c, rest)) => {
            s.first().is_some_and(|f| f.eq_ignore_ascii_case(c)) && glob(rest, &s[1..])
        }
    }
}

impl Store {
    /// An empty data set that refuses growing writes beyond `maxmemory` bytes.
    pub fn new(maxmemory: usize) -> Self {
        Store {
            map: BTreeMap::new(),
            used: 0,
            maxmemory,
        }
    }

    /// Keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes the data set takes (as counted against maxmemory).
    pub fn used_memory(&self) -> usize {
        self.used
    }

    /// The value of a key.
    pub fn get(&self, key: &[u8]) -> Option<&Value> {
        self.map.get(key)
    }

    fn remove(&mut self, key: &[u8]) -> Option<Value> {
        let v = self.map.remove(key)?;
        self.used = self
            .used
            .saturating_sub(key.len() + KEY_OVERHEAD + str_len(&v));
        Some(v)
    }

    fn put(&mut self, key: &[u8], v: Value) {
        self.remove(key);
        self.used += key.len() + KEY_OVERHEAD + str_len(&v);
        self.map.insert(key.to_vec(), v);
    }

    /// Runs one request, appending its reply to `out`.
    pub fn execute(&mut self, args: &[Vec<u8>], info: &ServerInfo, out: &mut Vec<u8>) -> Outcome {
        let Some(name) = args.first() else {
            return Outcome::default();
        };
        let lname = lower(name);
        let Some(cmd) = COMMANDS.iter().find(|c| c.name == lname) else {
            let mut shown = Vec::new();
            for a in &args[1..] {
                if shown.len() >= 128 {
                    break;
                }
                let room = 128 - shown.len();
                shown.push(b'\'');
                shown.extend_from_slice(c_str(a, room));
                shown.extend_from_slice(b"' ");
            }
            let mut e = b"ERR unknown command '".to_vec();
            e.extend_from_slice(c_str(name, 128));
            e.extend_from_slice(b"', with args beginning with: ");
            e.extend_from_slice(&shown);
            out.error(&e);
            return Outcome::default();
        };
        let n = args.len() as i32;
        if (cmd.arity > 0 && cmd.arity != n) || n < -cmd.arity {
            out.error(
                format!("ERR wrong number of arguments for '{}' command", cmd.name).as_bytes(),
            );
            return Outcome::default();
        }
        if cmd.grows && self.used > self.maxmemory {
            out.error(OOM);
            return Outcome::default();
        }
        let before = out.len();
        let mut outcome = Outcome::default();
        match cmd.name {
            "ping" => match args.len() {
                1 => out.simple("PONG"),
                2 => out.bulk(&args[1]),
                _ => arity_error(out, "ping"),
            },
            "echo" => out.bulk(&args[1]),
            "set" => self.set(args, out),
            "get" => match self.map.get(&args[1]) {
                None => out.nil(),
                Some(Value::Str(s)) => out.bulk(s),
                Some(Value::List(_)) => out.error(WRONGTYPE),
            },
            "mset" => {
                if args.len() % 2 == 0 {
                    arity_error(out, "mset");
                } else {
                    for kv in args[1..].chunks_exact(2) {
                        self.put(&kv[0], Value::Str(kv[1].clone()));
                    }
                    out.simple("OK");
                }
            }
            "del" => {
                let n = args[1..]
                    .iter()
                    .filter(|k| self.remove(k).is_some())
                    .count();
                out.integer(n as i64);
            }
            "exists" => {
                let n = args[1..]
                    .iter()
                    .filter(|k| self.map.contains_key(*k))
                    .count();
                out.integer(n as i64);
            }
            "incr" => self.incr(&args[1], out),
            "lpush" | "rpush" => self.push(args, cmd.name == "lpush", out),
            "lpop" | "rpop" => self.pop(args, cmd.name == "lpop", out),
            "lrange" => self.lrange(args, out),
            "llen" => match self.map.get(&args[1]) {
                None => out.integer(0),
                Some(Value::List(l)) => out.integer(l.len() as i64),
                Some(Value::Str(_)) => out.error(WRONGTYPE),
            },
            "dbsize" => out.integer(self.map.len() as i64),
            "flushall" => {
                let ok = match args.get(1) {
                    None => true,
                    Some(a) => {
                        args.len() == 2
                            && (a.eq_ignore_ascii_case(b"sync") || a.eq_ignore_ascii_case(b"async"))
                    }
                };
                if ok {
                    self.map.clear();
                    self.used = 0;
                    out.simple("OK");
                } else {
                    out.error(SYNTAX);
                }
            }
            "select" => match string_to_i64(&args[1]) {
                Some(0) => out.simple("OK"),
                Some(_) => out.error(b"ERR DB index is out of range"),
                None => out.error(NOT_INT),
            },
            "quit" => {
                out.simple("OK");
                outcome.close = true;
            }
            "config" => config(args, out),
            "command" => command(args, out),
            "info" => self.info(args, info, out),
            _ => unreachable!("every command in COMMANDS has a handler"),
        }
        outcome.log = cmd.write && out.get(before) != Some(&b'-');
        outcome
    }

    fn set(&mut self, args: &[Vec<u8>], out: &mut Vec<u8>) {
        let (mut nx, mut xx, mut get) = (false, false, false);
        for opt in &args[3..] {
            match lower(opt).as_str() {
                "nx" if !xx => nx = true,
                "xx" if !nx => xx = true,
                "get" => get = true,
                "keepttl" => {}
                _ => return out.error(SYNTAX),
            }
        }
        let old = self.map.get(&args[1]);
        if get && matches!(old, Some(Value::List(_))) {
            return out.error(WRONGTYPE);
        }
        let old_str = match old {
            Some(Value::Str(s)) if get => Some(s.clone()),
            _ => None,
        };
        let exists = old.is_some();
        if (nx && exists) || (xx && !exists) {
            return match (get, old_str) {
                (true, Some(s)) => out.bulk(&s),
                _ => out.nil(),
            };
        }
        self.put(&args[1], Value::Str(args[2].clone()));
        match (get, old_str) {
            (false, _) => out.simple("OK"),
            (true, Some(s)) => out.bulk(&s),
            (true, None) => out.nil(),
        }
    }

    fn incr(&mut self, key: &[u8], out: &mut Vec<u8>) {
        let cur = match self.map.get(key) {
            None => 0,
            Some(Value::List(_)) => return out.error(WRONGTYPE),
            Some(Value::Str(s)) => match string_to_i64(s) {
                Some(v) => v,
                None => return out.error(NOT_INT),
            },
        };
        let Some(new) = cur.checked_add(1) else {
            return out.error(b"ERR increment or decrement would overflow");
        };
        let mut text = Vec::new();
        text.integer(new);
        // ":<n>\r\n" → "<n>"
        let digits = text[1..text.len() - 2].to_vec();
        self.put(key, Value::Str(digits));
        out.integer(new);
    }

    fn push(&mut self, args: &[Vec<u8>], left: bool, out: &mut Vec<u8>) {
        let key = &args[1];
        let mut list = match self.map.get(key.as_slice()) {
            Some(Value::Str(_)) => return out.error(WRONGTYPE),
            Some(Value::List(_)) => match self.remove(key) {
                Some(Value::List(l)) => l,
                _ => VecDeque::new(),
            },
            None => VecDeque::new(),
        };
        for v in &args[2..] {
            if left {
                list.push_front(v.clone());
            } else {
                list.push_back(v.clone());
            }
        }
        let n = list.len();
        self.put(key, Value::List(list));
        out.integer(n as i64);
    }

    fn pop(&mut self, args: &[Vec<u8>], left: bool, out: &mut Vec<u8>) {
        if args.len() > 3 {
            return arity_error(out, if left { "lpop" } else { "rpop" });
        }
        let count = match args.get(2) {
            None => None,
            Some(c) => match string_to_i64(c) {
                Some(n) if n >= 0 => Some(n as usize),
                _ => return out.error(b"ERR value is out of range, must be positive"),
            },
        };
        let key = &args[1];
        match self.map.get(key.as_slice()) {
            None => {
                return if count.is_some() {
                    out.nil_array()
                } else {
                    out.nil()
                }
            }
            Some(Value::Str(_)) => return out.error(WRONGTYPE),
            Some(Value::List(_)) => {}
        }
        let Some(Value::List(mut list)) = self.remove(key) else {
            return out.nil();
        };
        let take = count.unwrap_or(1).min(list.len());
        let mut popped = Vec::with_capacity(take);
        for _ in 0..take {
            let v = if left {
                list.pop_front()
            } else {
                list.pop_back()
            };
            popped.extend(v);
        }
        if !list.is_empty() {
            self.put(key, Value::List(list));
        }
        match count {
            None => match popped.first() {
                Some(v) => out.bulk(v),
                None => out.nil(),
            },
            Some(_) => {
                out.array(popped.len());
                for v in &popped {
                    out.bulk(v);
                }
            }
        }
    }

    fn lrange(&mut self, args: &[Vec<u8>], out: &mut Vec<u8>) {
        let (Some(mut start), Some(mut end)) = (string_to_i64(&args[2]), string_to_i64(&args[3]))
        else {
            return out.error(NOT_INT);
        };
        let list = match self.map.get(&args[1]) {
            None => return out.array(0),
            Some(Value::Str(_)) => return out.error(WRONGTYPE),
            Some(Value::List(l)) => l,
        };
        let len = list.len() as i64;
        if start < 0 {
            start += len;
        }
        if end < 0 {
            end += len;
        }
        if start < 0 {
            start = 0;
        }
        if start > end || start >= len {
            return out.array(0);
        }
        if end >= len {
            end = len - 1;
        }
        out.array((end - start + 1) as usize);
        for v in list.range(start as usize..=end as usize) {
            out.bulk(v);
        }
    }

    fn info(&self, args: &[Vec<u8>], i: &ServerInfo, out: &mut Vec<u8>) {
        let sections: [(&str, String); 6] = [
            (
                "server",
                format!(
                    "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nos:Tandem kv guest\r\narch_bits:64\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n",
                    i.port, i.uptime_s
                ),
            ),
            (
                "clients",
                format!("# Clients\r\nconnected_clients:{}\r\n", i.clients),
            ),
            (
                "memory",
                format!(
                    "# Memory\r\nused_memory:{}\r\nmaxmemory:{}\r\n",
                    self.used, self.maxmemory
                ),
            ),
            (
                "persistence",
                format!(
                    "# Persistence\r\nloading:0\r\naof_enabled:1\r\naof_current_size:{}\r\n",
                    i.aof_bytes
                ),
            ),
            (
                "stats",
                format!("# Stats\r\ntotal_commands_processed:{}\r\n", i.commands),
            ),
            (
                "keyspace",
                if self.map.is_empty() {
                    String::from("# Keyspace\r\n")
                } else {
                    format!(
                        "# Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n",
                        self.map.len()
                    )
                },
            ),
        ];
        let want: Vec<String> = args[1..].iter().map(|a| lower(a)).collect();
        let all = want.is_empty()
            || want
                .iter()
                .any(|w| w == "all" || w == "everything" || w == "default");
        let mut text = String::new();
        for (name, body) in &sections {
            if all || want.iter().any(|w| w == name) {
                if !text.is_empty() {
                    text.push_str("\r\n");
                }
                text.push_str(body);
            }
        }
        out.bulk(text.as_bytes());
    }
}

/// Whether a request named `name` may change the data set (and so is logged).
pub fn is_write(name: &[u8]) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.write && c.name.as_bytes().eq_ignore_ascii_case(name))
}

fn arity_error(out: &mut Vec<u8>, name: &str) {
    out.error(format!("ERR wrong number of arguments for '{name}' command").as_bytes());
}

fn config(args: &[Vec<u8>], out: &mut Vec<u8>) {
    let sub = lower(&args[1]);
    match sub.as_str() {
        "get" => {
            if args.len() < 3 {
                return arity_error(out, "config|get");
            }
            let hits: Vec<&(&str, &str)> = CONFIG
                .iter()
                .filter(|(k, _)| args[2..].iter().any(|p| glob(p, k.as_bytes())))
                .collect();
            out.array(hits.len() * 2);
            for (k, v) in hits {
                out.bulk(k.as_bytes());
                out.bulk(v.as_bytes());
            }
        }
        "set" | "resetstat" | "rewrite" => out.error(
            format!(
                "ERR CONFIG {} is not supported by this server",
                sub.to_uppercase()
            )
            .as_bytes(),
        ),
        _ => {
            let mut e = b"ERR unknown subcommand '".to_vec();
            e.extend_from_slice(c_str(&args[1], 128));
            e.extend_from_slice(b"'. Try CONFIG HELP.");
            out.error(&e);
        }
    }
}

fn command(args: &[Vec<u8>], out: &mut Vec<u8>) {
    match args.get(1).map(|a| lower(a)).as_deref() {
        None => {
            out.array(COMMANDS.len());
            for c in COMMANDS {
                out.array(6);
                out.bulk(c.name.as_bytes());
                out.integer(i64::from(c.arity));
                out.array(1);
                out.simple(if c.write { "write" } else { "readonly" });
                let keyed = !matches!(
                    c.name,
                    "ping"
                        | "echo"
                        | "dbsize"
                        | "flushall"
                        | "select"
                        | "quit"
                        | "config"
                        | "command"
                        | "info"
                );
                let k = i64::from(keyed);
                out.integer(k);
                out.integer(if keyed && c.arity < 0 { -1 } else { k });
                out.integer(k);
            }
        }
        Some("count") => out.integer(COMMANDS.len() as i64),
        // redis-cli asks for the docs of every command at start (for its hints): none here.
        Some("docs") | Some("info") => out.array(0),
        Some(_) => {
            let mut e = b"ERR unknown subcommand '".to_vec();
            e.extend_from_slice(c_str(&args[1], 128));
            e.extend_from_slice(b"'. Try COMMAND HELP.");
            out.error(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn run(s: &mut Store, line: &str) -> String {
        let args = crate::resp::split_args(line.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.execute(&args, &ServerInfo::default(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_counters_and_lists_reply_as_redis_does() {
        let mut s = Store::new(1 << 20);
        assert_eq!(run(&mut s, "PING"), "+PONG\r\n");
        assert_eq!(run(&mut s, "ping hi"), "$2\r\nhi\r\n");
        assert_eq!(run(&mut s, "set k v"), "+OK\r\n");
        assert_eq!(run(&mut s, "set k w nx"), "$-1\r\n");
        assert_eq!(run(&mut s, "set k w xx get"), "$1\r\nv\r\n");
        assert_eq!(run(&mut s, "set k w nx xx"), "-ERR syntax error\r\n");
        assert_eq!(run(&mut s, "set k w ex 10"), "-ERR syntax error\r\n");
        assert_eq!(run(&mut s, "get k"), "$1\r\nw\r\n");
        assert_eq!(run(&mut s, "get nope"), "$-1\r\n");
        assert_eq!(run(&mut s, "incr n"), ":1\r\n");
        assert_eq!(run(&mut s, "incr n"), ":2\r\n");
        assert_eq!(
            run(&mut s, "incr k"),
            "-ERR value is not an integer or out of range\r\n"
        );
        run(&mut s, "set big 9223372036854775807");
        assert_eq!(
            run(&mut s, "incr big"),
            "-ERR increment or decrement would overflow\r\n"
        );
        assert_eq!(run(&mut s, "rpush l a b c"), ":3\r\n");
        assert_eq!(run(&mut s, "lpush l z"), ":4\r\n");
        assert_eq!(
            run(&mut s, "lrange l 0 -1"),
            "*4\r\n$1\r\nz\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"
        );
        assert_eq!(
            run(&mut s, "lrange l -2 100"),
            "*2\r\n$1\r\nb\r\n$1\r\nc\r\n"
        );
        assert_eq!(run(&mut s, "lrange l 5 1"), "*0\r\n");
        assert_eq!(
            run(&mut s, "lrange l x 1"),
            "-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(run(&mut s, "llen l"), ":4\r\n");
        assert_eq!(run(&mut s, "lpop l"), "$1\r\nz\r\n");
        assert_eq!(run(&mut s, "rpop l 2"), "*2\r\n$1\r\nc\r\n$1\r\nb\r\n");
        assert_eq!(run(&mut s, "lpop nope 2"), "*-1\r\n");
        assert_eq!(
            run(&mut s, "get l"),
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
        );
        assert_eq!(run(&mut s, "exists k k l nope"), ":3\r\n");
        assert_eq!(run(&mut s, "dbsize"), ":4\r\n");
        assert_eq!(run(&mut s, "del k nope"), ":1\r\n");
        assert_eq!(run(&mut s, "mset a 1 b 2"), "+OK\r\n");
        assert_eq!(
            run(&mut s, "mset a"),
            "-ERR wrong number of arguments for 'mset' command\r\n"
        );
        assert_eq!(run(&mut s, "flushall"), "+OK\r\n");
        assert_eq!(run(&mut s, "dbsize"), ":0\r\n");
        assert_eq!(s.used_memory(), 0);
    }

    #[test]
    fn unknown_commands_and_bad_arity_get_redis_errors() {
        let mut s = Store::new(1 << 20);
        assert_eq!(
            run(&mut s, "foo a b"),
            "-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n"
        );
        assert_eq!(
            run(&mut s, "foo"),
            "-ERR unknown command 'foo', with args beginning with: \r\n"
        );
        assert_eq!(
            run(&mut s, "GET"),
            "-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert_eq!(
            run(&mut s, "config get"),
            "-ERR wrong number of arguments for 'config|get' command\r\n"
        );
        assert_eq!(
            run(&mut s, "config get appendonly"),
            "*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n"
        );
        assert_eq!(run(&mut s, "config get nothing"), "*0\r\n");
        assert_eq!(run(&mut s, "command docs"), "*0\r\n");
        assert!(run(&mut s, "info").starts_with("$"));
    }

    #[test]
    fn writes_are_logged_and_refused_over_maxmemory() {
        let mut s = Store::new(200);
        let mut out = Vec::new();
        let set = |k: &str| vec![b"SET".to_vec(), k.as_bytes().to_vec(), vec![b'x'; 100]];
        let o = s.execute(&set("a"), &ServerInfo::default(), &mut out);
        assert!(o.log);
        let o = s.execute(&set("b"), &ServerInfo::default(), &mut out);
        assert!(o.log);
        out.clear();
        let o = s.execute(&set("c"), &ServerInfo::default(), &mut out);
        assert!(!o.log);
        assert_eq!(
            out,
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n".to_vec()
        );
        out.clear();
        let o = s.execute(
            &[b"DEL".to_vec(), b"a".to_vec()],
            &ServerInfo::default(),
            &mut out,
        );
        assert!(o.log, "DEL is allowed over maxmemory and logged");
        let o = s.execute(
            &[b"GET".to_vec(), b"b".to_vec()],
            &ServerInfo::default(),
            &mut out,
        );
        assert!(!o.log);
    }
}
