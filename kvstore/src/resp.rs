//! RESP2 requests, parsed as hostile input, and RESP2 replies.
//!
//! ```text
//!  multibulk:  *<count>\r\n  then <count> × ( $<len>\r\n <len bytes> \r\n )
//!  inline:     words separated by blanks, "double" (with \n \r \t \b \a \\ \xHH) or 'single'
//!              quoted, ending in \n (a \r before it is dropped)   — what telnet users type
//!
//!  limits (a request over one gets `-ERR Protocol error: …` and the connection is closed):
//!    count ≤ MAX_ARGS (65,536)      len ≤ MAX_BULK (1 MiB)      a line ≤ MAX_INLINE (64 KiB)
//!    a whole request ≤ MAX_REQUEST (4 MiB)
//! ```
//!
//! The parser follows `redis-server` 7.0 (`processMultibulkBuffer`, `processInlineBuffer`,
//! `sdssplitargs`): a count ≤ 0 is an empty request (skipped, no reply), the two bytes after a
//! bulk's data are skipped unchecked, and the error texts are Redis's own.

use alloc::string::String;
use alloc::vec::Vec;

fn err(why: &str) -> Parsed {
    Parsed::Error(why.into())
}

/// Most arguments in one request.
pub const MAX_ARGS: usize = 65_536;
/// Longest argument.
pub const MAX_BULK: usize = 1 << 20;
/// Longest inline request line, or `*`/`$` header line.
pub const MAX_INLINE: usize = 64 << 10;
/// Most bytes of one request (all its arguments).
pub const MAX_REQUEST: usize = 4 << 20;

/// What [`parse`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet: read more.
    Incomplete,
    /// A request of `used` bytes with no arguments (skipped, no reply).
    Empty {
        /// Bytes it took.
        used: usize,
    },
    /// A request.
    Request {
        /// Its arguments (the command name first).
        args: Vec<Vec<u8>>,
        /// Bytes it took.
        used: usize,
    },
    /// A protocol error: reply `-ERR Protocol error: <why>` and close the connection.
    Error(String),
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Parses the first request in `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(buf),
        Some(_) => parse_inline(buf),
    }
}

fn parse_multibulk(buf: &[u8]) -> Parsed {
    let Some(eol) = find_crlf(&buf[..buf.len().min(MAX_INLINE + 2)]) else {
        return if buf.len() > MAX_INLINE {
            err("too big mbulk count string")
        } else {
            Parsed::Incomplete
        };
    };
    let count = match string_to_i64(&buf[1..eol]) {
        Some(n) if n <= MAX_ARGS as i64 => n,
        _ => return err("invalid multibulk length"),
    };
    let mut at = eol + 2;
    if count <= 0 {
        return Parsed::Empty { used: at };
    }
    let count = count as usize;
    // Never trust the count for an allocation: each argument takes at least 4 bytes.
    let mut args = Vec::with_capacity(count.min(buf.len() / 4 + 1));
    let mut total = 0usize;
    for _ in 0..count {
        let rest = &buf[at..];
        let Some(eol) = find_crlf(&rest[..rest.len().min(MAX_INLINE + 2)]) else {
            return if rest.len() > MAX_INLINE {
                err("too big bulk count string")
            } else {
                Parsed::Incomplete
            };
        };
        if rest[0] != b'$' {
            let mut why = String::from("expected '$', got '");
            why.push(char::from(rest[0]));
            why.push('\'');
            return Parsed::Error(why);
        }
        let len = match string_to_i64(&rest[1..eol]) {
            Some(n) if (0..=MAX_BULK as i64).contains(&n) => n as usize,
            _ => return err("invalid bulk length"),
        };
        total += len;
        if total > MAX_REQUEST {
            return err("request too large");
        }
        let start = at + eol + 2;
        // The data and the two bytes after it (skipped unchecked, as Redis does).
        if buf.len() < start + len + 2 {
            return Parsed::Incomplete;
        }
        args.push(buf[start..start + len].to_vec());
        at = start + len + 2;
    }
    Parsed::Request { args, used: at }
}

fn parse_inline(buf: &[u8]) -> Parsed {
    let Some(nl) = buf[..buf.len().min(MAX_INLINE + 1)]
        .iter()
        .position(|&b| b == b'\n')
    else {
        return if buf.len() > MAX_INLINE {
            err("too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let mut line = &buf[..nl];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    match split_args(line) {
        None => err("unbalanced quotes in request"),
        Some(args) if args.is_empty() => Parsed::Empty { used: nl + 1 },
        Some(args) => Parsed::Request { args, used: nl + 1 },
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `sdssplitargs`: words, "double" and 'single' quoted strings. `None` on unbalanced quotes
/// or a closing quote not followed by a blank. A NUL ends the line (Redis reads a C string).
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = match line.iter().position(|&b| b == 0) {
        Some(n) => &line[..n],
        None => line,
    };
    let at = |i: usize| line.get(i).copied();
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while at(p).is_some_and(is_space) {
            p += 1;
        }
        if p >= line.len() {
            return Some(args);
        }
        let (mut inq, mut insq) = (false, false);
        let mut cur = Vec::new();
        loop {
            let Some(c) = at(p) else {
                if inq || insq {
                    return None;
                }
                break;
            };
            if inq {
                if c == b'\\' && at(p + 1) == Some(b'x') {
                    if let (Some(h), Some(l)) = (at(p + 2).and_then(hex), at(p + 3).and_then(hex)) {
                        cur.push(h * 16 + l);
                        p += 4;
                        continue;
                    }
                }
                if c == b'\\' && at(p + 1).is_some() {
                    p += 1;
                    cur.push(match line[p] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(p + 1).is_some_and(|n| !is_space(n)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if insq {
                if c == b'\\' && at(p + 1) == Some(b'\'') {
                    p += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1).is_some_and(|n| !is_space(n)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' => {
                        p += 1;
                        break;
                    }
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    _ => cur.push(c),
                }
            }
            p += 1;
        }
        args.push(cur);
    }
}

/// Redis's `string2ll`: an optional `-`, then digits with no leading zero (or a lone `0`),
/// at most 20 characters, in range. Anything else (spaces, `+`, `-0`, empty) is not a number.
pub fn string_to_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s[0] {
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// Appends RESP2 replies to a buffer.
pub trait Reply {
    /// `+text`.
    fn simple(&mut self, text: &str);
    /// `-text` (the text includes its prefix, e.g. `ERR …`).
    fn error(&mut self, text: &[u8]);
    /// `:n`.
    fn integer(&mut self, n: i64);
    /// `$len` + data.
    fn bulk(&mut self, data: &[u8]);
    /// `$-1` (nil).
    fn nil(&mut self);
    /// `*n` (an array of `n` replies follows).
    fn array(&mut self, n: usize);
    /// `*-1` (nil array).
    fn nil_array(&mut self);
}

fn push_num(out: &mut Vec<u8>, n: i64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let neg = n < 0;
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        out.push(b'-');
    }
    out.extend_from_slice(&tmp[i..]);
}

impl Reply for Vec<u8> {
    fn simple(&mut self, text: &str) {
        self.push(b'+');
        self.extend_from_slice(text.as_bytes());
        self.extend_from_slice(b"\r\n");
    }
    fn error(&mut self, text: &[u8]) {
        self.push(b'-');
        // A reply line may not hold a newline: Redis turns them into spaces.
        self.extend(
            text.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        self.extend_from_slice(b"\r\n");
    }
    fn integer(&mut self, n: i64) {
        self.push(b':');
        push_num(self, n);
        self.extend_from_slice(b"\r\n");
    }
    fn bulk(&mut self, data: &[u8]) {
        self.push(b'$');
        push_num(self, data.len() as i64);
        self.extend_from_slice(b"\r\n");
        self.extend_from_slice(data);
        self.extend_from_slice(b"\r\n");
    }
    fn nil(&mut self) {
        self.extend_from_slice(b"$-1\r\n");
    }
    fn array(&mut self, n: usize) {
        self.push(b'*');
        push_num(self, n as i64);
        self.extend_from_slice(b"\r\n");
    }
    fn nil_array(&mut self) {
        self.extend_from_slice(b"*-1\r\n");
    }
}

/// The RESP2 encoding of a request (as clients send it, and as the log stores it).
pub fn encode_request(args: &[&[u8]], out: &mut Vec<u8>) {
    out.array(args.len());
    for a in args {
        out.bulk(a);
    }
}

/// The length of the first whole RESP2 reply in `buf` (what a client reads): `Ok(None)` when
/// more bytes are needed, `Err` when `buf` does not start with a reply. Nesting is bounded
/// (arrays of arrays deeper than 32 are refused).
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    fn at(buf: &[u8], depth: u32) -> Result<Option<usize>, &'static str> {
        if depth > 32 {
            return Err("replies nested too deep");
        }
        let Some(eol) = find_crlf(buf) else {
            return Ok(None);
        };
        let head = eol + 2;
        let n = || string_to_i64(&buf[1..eol]).ok_or("bad length in a reply");
        match buf[0] {
            b'+' | b'-' | b':' => Ok(Some(head)),
            b'$' => {
                let n = n()?;
                if n < 0 {
                    return Ok(Some(head));
                }
                let end = head
                    .checked_add(n as usize)
                    .and_then(|e| e.checked_add(2))
                    .ok_or("bulk length overflows")?;
                Ok((buf.len() >= end).then_some(end))
            }
            b'*' => {
                let n = n()?;
                let mut end = head;
                for _ in 0..n.max(0) {
                    match at(&buf[end..], depth + 1)? {
                        Some(l) => end += l,
                        None => return Ok(None),
                    }
                }
                Ok(Some(end))
            }
            _ => Err("not a RESP2 reply"),
        }
    }
    if buf.is_empty() {
        return Ok(None);
    }
    at(buf, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn req(args: &[&str]) -> Vec<Vec<u8>> {
        args.iter().map(|a| a.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk_and_inline_requests_parse_and_pipelined_ones_follow() {
        let buf = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n";
        let Parsed::Request { args, used } = parse(buf) else {
            panic!()
        };
        assert_eq!(args, req(&["GET", "k"]));
        assert_eq!(
            parse(&buf[used..]),
            Parsed::Request {
                args: req(&["PING"]),
                used: 6
            }
        );
        for cut in 0..buf.len() - 6 {
            if cut < 23 {
                assert_eq!(parse(&buf[..cut]), Parsed::Incomplete, "cut {cut}");
            }
        }
        assert_eq!(parse(b"*0\r\n"), Parsed::Empty { used: 4 });
        assert_eq!(parse(b"*-1\r\n"), Parsed::Empty { used: 5 });
        assert_eq!(parse(b"\r\n"), Parsed::Empty { used: 2 });
    }

    #[test]
    fn hostile_lengths_and_counts_are_refused_before_any_allocation() {
        assert_eq!(parse(b"*99999999999\r\n"), err("invalid multibulk length"));
        assert_eq!(parse(b"*65537\r\n"), err("invalid multibulk length"));
        assert_eq!(parse(b"*x\r\n"), err("invalid multibulk length"));
        assert_eq!(parse(b"*1\r\n$-1\r\n"), err("invalid bulk length"));
        assert_eq!(parse(b"*1\r\n$1048577\r\n"), err("invalid bulk length"));
        assert_eq!(parse(b"*1\r\n:1\r\n"), err("expected '$', got ':'"));
        let big = vec![b'a'; MAX_INLINE + 1];
        assert_eq!(parse(&big), err("too big inline request"));
        let mut big = b"*".to_vec();
        big.extend(vec![b'1'; MAX_INLINE + 1]);
        assert_eq!(parse(&big), err("too big mbulk count string"));
        // Five arguments of 1 MiB: over the request limit at the fifth header.
        let mut buf = b"*5\r\n".to_vec();
        for _ in 0..5 {
            buf.extend_from_slice(b"$1048576\r\n");
            buf.extend(vec![b'x'; 1 << 20]);
            buf.extend_from_slice(b"\r\n");
        }
        assert_eq!(parse(&buf), err("request too large"));
    }

    #[test]
    fn inline_words_and_quotes_split_as_sdssplitargs_does() {
        let s = |l: &str| split_args(l.as_bytes());
        assert_eq!(s("set  k   v"), Some(req(&["set", "k", "v"])));
        assert_eq!(s(r#"set "a b" 'c d'"#), Some(req(&["set", "a b", "c d"])));
        assert_eq!(s(r#""\x41\n\q""#), Some(vec![b"A\nq".to_vec()]));
        assert_eq!(s(r#"'it\'s'"#), Some(req(&["it's"])));
        assert_eq!(s(r#""open"#), None);
        assert_eq!(s(r#""a"b"#), None);
        assert_eq!(s("'a'b"), None);
        assert_eq!(s(""), Some(vec![]));
        assert_eq!(parse(b"ping \"x\r\n"), err("unbalanced quotes in request"));
    }

    #[test]
    fn numbers_follow_string2ll() {
        for (s, v) in [
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("01", None),
            ("-0", None),
            ("+1", None),
            (" 1", None),
            ("", None),
            ("1a", None),
        ] {
            assert_eq!(string_to_i64(s.as_bytes()), v, "{s}");
        }
    }

    #[test]
    fn reply_lengths_are_found_in_partial_and_pipelined_replies() {
        let r = b"*2\r\n$2\r\nhi\r\n:5\r\n+OK\r\n";
        assert_eq!(reply_len(r), Ok(Some(16)));
        assert_eq!(reply_len(&r[16..]), Ok(Some(5)));
        for cut in 0..16 {
            assert_eq!(reply_len(&r[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(reply_len(b"$-1\r\n"), Ok(Some(5)));
        assert_eq!(reply_len(b"*-1\r\n"), Ok(Some(5)));
        assert!(reply_len(b"x\r\n").is_err());
        assert!(reply_len(b"$99999999999999999999\r\n").is_err());
    }

    #[test]
    fn replies_encode_as_resp2() {
        let mut out = Vec::new();
        out.simple("OK");
        out.error(b"ERR bad\r\nthing");
        out.integer(-42);
        out.bulk(b"hi");
        out.nil();
        out.array(2);
        out.nil_array();
        assert_eq!(
            out,
            b"+OK\r\n-ERR bad  thing\r\n:-42\r\n$2\r\nhi\r\n$-1\r\n*2\r\n*-1\r\n".to_vec()
        );
        let mut r = Vec::new();
        encode_request(&[b"SET", b"k", b""], &mut r);
        assert_eq!(r, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec());
    }
}
