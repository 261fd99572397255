//! Byte-for-byte reproduction of what CPython 3.11's `json` module prints
//! and of the error messages `json.loads` raises.
//!
//! The millracer CLI must stay output-compatible with the Python reference
//! tool (millracer 0.2.0), which renders results with
//! `json.dumps(..., indent=2, sort_keys=True)`, reports decode failures as
//! `millracer: error: {exc}` and interpolates decoded values into messages
//! with `str()`. serde_json's own formatting differs in many small ways
//! (key order, `ensure_ascii`, float notation, error wording and positions),
//! so this module re-implements the Python behaviour on top of
//! `serde_json::Value` using only `std`.
//!
//! Behaviour that is deliberately tied to the reference:
//! * `decode_error` follows the C accelerator (`_json.c`) that
//!   `json.loads` really uses in 3.11, not the pure-Python fallback in
//!   `json/decoder.py`; the two differ in wording (`Invalid control character
//!   at`, `Invalid \escape`, without the offending character).
//! * Recursion depth is matched against the reference CLI's call depth (see
//!   `MAX_NESTING`).

use serde_json::{Map, Number, Value};
use std::fmt::Write as _;

/// Renders `value` exactly like Python's
/// `json.dumps(value, indent=2, sort_keys=True)`.
///
/// Why: the reference CLI prints every result document this way, and
/// callers diff our stdout against it byte for byte. Keys are sorted by code
/// point here because serde_json (with `preserve_order`) keeps insertion
/// order; non-ASCII is escaped because Python's default is
/// `ensure_ascii=True`; there is no trailing newline because `json.dumps`
/// adds none (the caller's `print` does).
pub fn to_pretty(value: &Value) -> String {
    let mut out = String::new();
    write_pretty(&mut out, value, 0);
    out
}

/// Renders `value` exactly like Python's
/// `json.dumps(value, sort_keys=True, separators=(",", ":"))`.
///
/// Why: JSON-lines streams must be one compact line per record and must
/// match the reference's compact form, so keys are sorted, no spaces are
/// emitted and non-ASCII is escaped (`ensure_ascii=True`), which also
/// guarantees no raw line separators can split a record.
pub fn to_line(value: &Value) -> String {
    let mut out = String::new();
    write_compact(&mut out, value);
    out
}

/// Returns the message CPython 3.11's `json.loads(input)` would raise for
/// `input`, or `None` when Python would accept it.
///
/// Why: the reference CLI reports malformed requests as
/// `millracer: error: {exc}`, so we must reproduce Python's wording and its
/// positions (counted in code points, with Python's line/column rules)
/// rather than serde_json's. The scanner only validates, mirrors the C
/// accelerator step by step (so the *first* error Python would hit is the
/// one reported), accepts what Python accepts (`NaN`, `Infinity`,
/// `-Infinity`, lone surrogate escapes) and never panics. Besides
/// `JSONDecodeError` messages it also reproduces the two other exceptions
/// `json.loads` can raise on text input: `RecursionError` for
/// deep nesting and the 4300-digit integer conversion limit.
pub fn decode_error(input: &str) -> Option<String> {
    if input.starts_with('\u{feff}') {
        return Some(format_error(
            &[],
            "Unexpected UTF-8 BOM (decode using utf-8-sig)",
            0,
        ));
    }
    let chars: Vec<char> = input.chars().collect();
    let scanner = Scanner { s: &chars };
    let start = scanner.skip_ws(0);
    match scanner.scan(start) {
        Ok(end) => {
            let end = scanner.skip_ws(end);
            if end == chars.len() {
                None
            } else {
                Some(format_error(&chars, "Extra data", end))
            }
        }
        Err(Fail::StopIteration(pos)) => Some(format_error(&chars, "Expecting value", pos)),
        Err(Fail::Decode(msg, pos)) => Some(format_error(&chars, msg, pos)),
        Err(Fail::Plain(msg)) => Some(msg),
    }
}

/// Returns Python's `str()` of the object `json.loads` would have produced
/// for `value`.
///
/// Why: the reference interpolates decoded values into error messages with
/// f-strings (e.g. `unsupported ops schema: None`), so we need `str()` of
/// the top level (a string prints bare) and `repr()` of anything nested
/// (quoted strings, `True`/`False`/`None`, dicts in insertion order, which
/// `preserve_order` gives us).
pub fn py_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => {
            let mut out = String::new();
            write_py_repr(&mut out, other);
            out
        }
    }
}

// ---------------------------------------------------------------------------
// Encoding (json.dumps)
// ---------------------------------------------------------------------------

/// Object members sorted by key. Rust's `str` ordering compares UTF-8 bytes,
/// which is the same order as Python's code-point comparison of `str`.
fn sorted_members(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut members: Vec<(&String, &Value)> = map.iter().collect();
    members.sort_by(|a, b| a.0.cmp(b.0));
    members
}

fn push_indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn write_pretty(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                push_indent(out, level + 1);
                write_pretty(out, item, level + 1);
            }
            out.push('\n');
            push_indent(out, level);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in sorted_members(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                push_indent(out, level + 1);
                write_json_string(out, key);
                out.push_str(": ");
                write_pretty(out, item, level + 1);
            }
            out.push('\n');
            push_indent(out, level);
            out.push('}');
        }
        scalar_or_empty => write_compact(out, scalar_or_empty),
    }
}

fn write_compact(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n, true),
        Value::String(s) => write_json_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_compact(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in sorted_members(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(out, key);
                out.push(':');
                write_compact(out, item);
            }
            out.push('}');
        }
    }
}

/// `ensure_ascii=True` string encoding, as in `_json.c`'s
/// `ascii_escape_unichar`: printable ASCII (`' '..='~'`) verbatim, the short
/// escapes Python uses, everything else as lower-case `\uXXXX` (astral code
/// points as a UTF-16 surrogate pair). Note that DEL (0x7f) is escaped too.
fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(ch),
            _ => {
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
        }
    }
    out.push('"');
}

/// Integers print as integers; floats as Python's `float.__repr__`.
/// `json_constants` selects how non-finite floats would be spelled
/// (`NaN`/`Infinity` in JSON, `nan`/`inf` in `repr`); serde_json cannot
/// actually hold them, this only keeps the function total.
fn write_number(out: &mut String, n: &Number, json_constants: bool) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else {
        // With serde_json's `arbitrary_precision` feature a big integer
        // literal stays a digit string; Python would keep it an `int`.
        let text = n.to_string();
        let digits = text.strip_prefix('-').unwrap_or(&text);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&text);
            return;
        }
        let f = n.as_f64().unwrap_or(f64::NAN);
        if f.is_finite() {
            out.push_str(&float_repr(f));
        } else {
            let spelled = match (json_constants, f.is_nan(), f > 0.0) {
                (true, true, _) => "NaN",
                (true, false, true) => "Infinity",
                (true, false, false) => "-Infinity",
                (false, true, _) => "nan",
                (false, false, true) => "inf",
                (false, false, false) => "-inf",
            };
            out.push_str(spelled);
        }
    }
}

/// Python's `repr(float)` for finite values: the shortest digit string that
/// round-trips (see [`shortest_digits`]), positional notation with at least
/// one fractional digit when the decimal exponent is in `-4..16`, otherwise
/// `d.ddde±XX` with at least two exponent digits.
fn float_repr(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    let (digits, exp) = shortest_digits(f.abs());
    let mut out = String::new();
    if f < 0.0 {
        out.push('-');
    }
    if !(-4..16).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(out, "e{sign}{:02}", exp.unsigned_abs());
    } else if exp < 0 {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let int_len = exp.unsigned_abs() as usize + 1;
        if digits.len() > int_len {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        } else {
            out.push_str(&digits);
            for _ in digits.len()..int_len {
                out.push('0');
            }
            out.push_str(".0");
        }
    }
    out
}

/// Splits Rust's `{:e}` rendering (`d.ddde-x`) into its digit string and
/// decimal exponent.
fn split_sci(sci: &str) -> (String, i32) {
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci, "0"));
    let digits = mantissa.chars().filter(char::is_ascii_digit).collect();
    (digits, exp.parse().unwrap_or(0))
}

/// Shortest round-tripping significant digits of a finite `f > 0` and the
/// decimal exponent of the first digit, chosen the way CPython's `dtoa`
/// (mode 0) chooses them.
///
/// Rust's `{:e}` finds the same (minimal) number of digits, but when two
/// candidates of that length are exactly equally close to the binary value
/// it rounds the tie up, whereas CPython rounds half to even (e.g.
/// `581195753437852.25` prints as `581195753437852.2` in Python but
/// `…852.3` in Rust). So the digits are recomputed as the exact decimal
/// expansion rounded half-to-even to that length, keeping Rust's answer if
/// that candidate would not round-trip.
fn shortest_digits(f: f64) -> (String, i32) {
    let (short, short_exp) = split_sci(&format!("{f:e}"));
    let n = short.len();
    // A tie needs the exact expansion to be exactly `n` digits followed by a
    // single 5; its correctly rounded `n + 1`-digit form then ends in 5. This
    // cheap probe skips the exact expansion for almost every value.
    let probe = format!("{f:.n$e}");
    if !probe.split_once('e').is_some_and(|(m, _)| m.ends_with('5')) {
        return (short, short_exp);
    }
    // Every f64 has at most 767 significant decimal digits, so this is exact.
    let (exact, mut exp) = split_sci(&format!("{f:.767e}"));
    let exact = exact.as_bytes();
    let (Some(head), Some(rest)) = (exact.get(..n), exact.get(n..)) else {
        return (short, short_exp);
    };
    let mut head = head.to_vec();
    let round_up = match rest.split_first() {
        Some((b'5', tail)) if tail.iter().all(|d| *d == b'0') => {
            head.last().is_some_and(|d| (d - b'0') % 2 == 1)
        }
        Some((first, _)) => *first >= b'5',
        None => false,
    };
    if round_up {
        let mut carry = true;
        for d in head.iter_mut().rev() {
            if *d == b'9' {
                *d = b'0';
            } else {
                *d += 1;
                carry = false;
                break;
            }
        }
        if carry {
            head.insert(0, b'1');
            head.pop();
            exp += 1;
        }
    }
    while head.len() > 1 && head.last() == Some(&b'0') {
        head.pop();
    }
    let candidate = String::from_utf8_lossy(&head).into_owned();
    let reparsed = format!("{}.{}e{exp}", &candidate[..1], &candidate[1..]);
    if reparsed.parse::<f64>() == Ok(f) {
        (candidate, exp)
    } else {
        (short, short_exp)
    }
}

// ---------------------------------------------------------------------------
// str()/repr() of decoded values
// ---------------------------------------------------------------------------

fn write_py_repr(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => write_number(out, n, false),
        Value::String(s) => write_py_str_repr(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_repr(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_str_repr(out, key);
                out.push_str(": ");
                write_py_repr(out, item);
            }
            out.push('}');
        }
    }
}

/// Python's `repr(str)` (`unicode_repr` in CPython): single quotes unless
/// the text contains `'` but no `"`; backslash, the chosen quote, `\t`,
/// `\n`, `\r` escaped; other ASCII controls and DEL as `\xNN`; non-ASCII
/// kept unless `str.isprintable()` is false for it, in which case it becomes
/// `\xNN`, `\uNNNN` or `\UNNNNNNNN`.
fn write_py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for ch in s.chars() {
        let cp = u32::from(ch);
        if ch == quote || ch == '\\' {
            out.push('\\');
            out.push(ch);
        } else if ch == '\t' {
            out.push_str("\\t");
        } else if ch == '\n' {
            out.push_str("\\n");
        } else if ch == '\r' {
            out.push_str("\\r");
        } else if cp < 0x20 || cp == 0x7f {
            let _ = write!(out, "\\x{cp:02x}");
        } else if cp < 0x7f || is_printable(cp) {
            out.push(ch);
        } else if cp <= 0xff {
            let _ = write!(out, "\\x{cp:02x}");
        } else if cp <= 0xffff {
            let _ = write!(out, "\\u{cp:04x}");
        } else {
            let _ = write!(out, "\\U{cp:08x}");
        }
    }
    out.push(quote);
}

/// Python 3.11's `str.isprintable()` for one non-ASCII code point
/// (Unicode 14.0.0: everything except categories Cc, Cf, Cs, Co, Cn, Zl, Zp
/// and Zs). Rust's std exposes no such predicate and its Unicode version
/// differs, so the table below was generated from `python3.11`.
fn is_printable(cp: u32) -> bool {
    NON_PRINTABLE_BOUNDS.partition_point(|&b| b <= cp) % 2 == 0
}

/// Sorted boundaries of the non-printable code-point ranges at or above
/// U+0080: entries alternate between an inclusive start and an exclusive end,
/// so a code point is non-printable iff an odd number of boundaries are
/// `<=` it.
const NON_PRINTABLE_BOUNDS: &[u32] = &[
    0x80, 0xA1, 0xAD, 0xAE, 0x378, 0x37A, 0x380, 0x384, 0x38B, 0x38C, 0x38D, 0x38E, 0x3A2, 0x3A3,
    0x530, 0x531, 0x557, 0x559, 0x58B, 0x58D, 0x590, 0x591, 0x5C8, 0x5D0, 0x5EB, 0x5EF, 0x5F5,
    0x606, 0x61C, 0x61D, 0x6DD, 0x6DE, 0x70E, 0x710, 0x74B, 0x74D, 0x7B2, 0x7C0, 0x7FB, 0x7FD,
    0x82E, 0x830, 0x83F, 0x840, 0x85C, 0x85E, 0x85F, 0x860, 0x86B, 0x870, 0x88F, 0x898, 0x8E2,
    0x8E3, 0x984, 0x985, 0x98D, 0x98F, 0x991, 0x993, 0x9A9, 0x9AA, 0x9B1, 0x9B2, 0x9B3, 0x9B6,
    0x9BA, 0x9BC, 0x9C5, 0x9C7, 0x9C9, 0x9CB, 0x9CF, 0x9D7, 0x9D8, 0x9DC, 0x9DE, 0x9DF, 0x9E4,
    0x9E6, 0x9FF, 0xA01, 0xA04, 0xA05, 0xA0B, 0xA0F, 0xA11, 0xA13, 0xA29, 0xA2A, 0xA31, 0xA32,
    0xA34, 0xA35, 0xA37, 0xA38, 0xA3A, 0xA3C, 0xA3D, 0xA3E, 0xA43, 0xA47, 0xA49, 0xA4B, 0xA4E,
    0xA51, 0xA52, 0xA59, 0xA5D, 0xA5E, 0xA5F, 0xA66, 0xA77, 0xA81, 0xA84, 0xA85, 0xA8E, 0xA8F,
    0xA92, 0xA93, 0xAA9, 0xAAA, 0xAB1, 0xAB2, 0xAB4, 0xAB5, 0xABA, 0xABC, 0xAC6, 0xAC7, 0xACA,
    0xACB, 0xACE, 0xAD0, 0xAD1, 0xAE0, 0xAE4, 0xAE6, 0xAF2, 0xAF9, 0xB00, 0xB01, 0xB04, 0xB05,
    0xB0D, 0xB0F, 0xB11, 0xB13, 0xB29, 0xB2A, 0xB31, 0xB32, 0xB34, 0xB35, 0xB3A, 0xB3C, 0xB45,
    0xB47, 0xB49, 0xB4B, 0xB4E, 0xB55, 0xB58, 0xB5C, 0xB5E, 0xB5F, 0xB64, 0xB66, 0xB78, 0xB82,
    0xB84, 0xB85, 0xB8B, 0xB8E, 0xB91, 0xB92, 0xB96, 0xB99, 0xB9B, 0xB9C, 0xB9D, 0xB9E, 0xBA0,
    0xBA3, 0xBA5, 0xBA8, 0xBAB, 0xBAE, 0xBBA, 0xBBE, 0xBC3, 0xBC6, 0xBC9, 0xBCA, 0xBCE, 0xBD0,
    0xBD1, 0xBD7, 0xBD8, 0xBE6, 0xBFB, 0xC00, 0xC0D, 0xC0E, 0xC11, 0xC12, 0xC29, 0xC2A, 0xC3A,
    0xC3C, 0xC45, 0xC46, 0xC49, 0xC4A, 0xC4E, 0xC55, 0xC57, 0xC58, 0xC5B, 0xC5D, 0xC5E, 0xC60,
    0xC64, 0xC66, 0xC70, 0xC77, 0xC8D, 0xC8E, 0xC91, 0xC92, 0xCA9, 0xCAA, 0xCB4, 0xCB5, 0xCBA,
    0xCBC, 0xCC5, 0xCC6, 0xCC9, 0xCCA, 0xCCE, 0xCD5, 0xCD7, 0xCDD, 0xCDF, 0xCE0, 0xCE4, 0xCE6,
    0xCF0, 0xCF1, 0xCF3, 0xD00, 0xD0D, 0xD0E, 0xD11, 0xD12, 0xD45, 0xD46, 0xD49, 0xD4A, 0xD50,
    0xD54, 0xD64, 0xD66, 0xD80, 0xD81, 0xD84, 0xD85, 0xD97, 0xD9A, 0xDB2, 0xDB3, 0xDBC, 0xDBD,
    0xDBE, 0xDC0, 0xDC7, 0xDCA, 0xDCB, 0xDCF, 0xDD5, 0xDD6, 0xDD7, 0xDD8, 0xDE0, 0xDE6, 0xDF0,
    0xDF2, 0xDF5, 0xE01, 0xE3B, 0xE3F, 0xE5C, 0xE81, 0xE83, 0xE84, 0xE85, 0xE86, 0xE8B, 0xE8C,
    0xEA4, 0xEA5, 0xEA6, 0xEA7, 0xEBE, 0xEC0, 0xEC5, 0xEC6, 0xEC7, 0xEC8, 0xECE, 0xED0, 0xEDA,
    0xEDC, 0xEE0, 0xF00, 0xF48, 0xF49, 0xF6D, 0xF71, 0xF98, 0xF99, 0xFBD, 0xFBE, 0xFCD, 0xFCE,
    0xFDB, 0x1000, 0x10C6, 0x10C7, 0x10C8, 0x10CD, 0x10CE, 0x10D0, 0x1249, 0x124A, 0x124E, 0x1250,
    0x1257, 0x1258, 0x1259, 0x125A, 0x125E, 0x1260, 0x1289, 0x128A, 0x128E, 0x1290, 0x12B1, 0x12B2,
    0x12B6, 0x12B8, 0x12BF, 0x12C0, 0x12C1, 0x12C2, 0x12C6, 0x12C8, 0x12D7, 0x12D8, 0x1311, 0x1312,
    0x1316, 0x1318, 0x135B, 0x135D, 0x137D, 0x1380, 0x139A, 0x13A0, 0x13F6, 0x13F8, 0x13FE, 0x1400,
    0x1680, 0x1681, 0x169D, 0x16A0, 0x16F9, 0x1700, 0x1716, 0x171F, 0x1737, 0x1740, 0x1754, 0x1760,
    0x176D, 0x176E, 0x1771, 0x1772, 0x1774, 0x1780, 0x17DE, 0x17E0, 0x17EA, 0x17F0, 0x17FA, 0x1800,
    0x180E, 0x180F, 0x181A, 0x1820, 0x1879, 0x1880, 0x18AB, 0x18B0, 0x18F6, 0x1900, 0x191F, 0x1920,
    0x192C, 0x1930, 0x193C, 0x1940, 0x1941, 0x1944, 0x196E, 0x1970, 0x1975, 0x1980, 0x19AC, 0x19B0,
    0x19CA, 0x19D0, 0x19DB, 0x19DE, 0x1A1C, 0x1A1E, 0x1A5F, 0x1A60, 0x1A7D, 0x1A7F, 0x1A8A, 0x1A90,
    0x1A9A, 0x1AA0, 0x1AAE, 0x1AB0, 0x1ACF, 0x1B00, 0x1B4D, 0x1B50, 0x1B7F, 0x1B80, 0x1BF4, 0x1BFC,
    0x1C38, 0x1C3B, 0x1C4A, 0x1C4D, 0x1C89, 0x1C90, 0x1CBB, 0x1CBD, 0x1CC8, 0x1CD0, 0x1CFB, 0x1D00,
    0x1F16, 0x1F18, 0x1F1E, 0x1F20, 0x1F46, 0x1F48, 0x1F4E, 0x1F50, 0x1F58, 0x1F59, 0x1F5A, 0x1F5B,
    0x1F5C, 0x1F5D, 0x1F5E, 0x1F5F, 0x1F7E, 0x1F80, 0x1FB5, 0x1FB6, 0x1FC5, 0x1FC6, 0x1FD4, 0x1FD6,
    0x1FDC, 0x1FDD, 0x1FF0, 0x1FF2, 0x1FF5, 0x1FF6, 0x1FFF, 0x2010, 0x2028, 0x2030, 0x205F, 0x2070,
    0x2072, 0x2074, 0x208F, 0x2090, 0x209D, 0x20A0, 0x20C1, 0x20D0, 0x20F1, 0x2100, 0x218C, 0x2190,
    0x2427, 0x2440, 0x244B, 0x2460, 0x2B74, 0x2B76, 0x2B96, 0x2B97, 0x2CF4, 0x2CF9, 0x2D26, 0x2D27,
    0x2D28, 0x2D2D, 0x2D2E, 0x2D30, 0x2D68, 0x2D6F, 0x2D71, 0x2D7F, 0x2D97, 0x2DA0, 0x2DA7, 0x2DA8,
    0x2DAF, 0x2DB0, 0x2DB7, 0x2DB8, 0x2DBF, 0x2DC0, 0x2DC7, 0x2DC8, 0x2DCF, 0x2DD0, 0x2DD7, 0x2DD8,
    0x2DDF, 0x2DE0, 0x2E5E, 0x2E80, 0x2E9A, 0x2E9B, 0x2EF4, 0x2F00, 0x2FD6, 0x2FF0, 0x2FFC, 0x3001,
    0x3040, 0x3041, 0x3097, 0x3099, 0x3100, 0x3105, 0x3130, 0x3131, 0x318F, 0x3190, 0x31E4, 0x31F0,
    0x321F, 0x3220, 0xA48D, 0xA490, 0xA4C7, 0xA4D0, 0xA62C, 0xA640, 0xA6F8, 0xA700, 0xA7CB, 0xA7D0,
    0xA7D2, 0xA7D3, 0xA7D4, 0xA7D5, 0xA7DA, 0xA7F2, 0xA82D, 0xA830, 0xA83A, 0xA840, 0xA878, 0xA880,
    0xA8C6, 0xA8CE, 0xA8DA, 0xA8E0, 0xA954, 0xA95F, 0xA97D, 0xA980, 0xA9CE, 0xA9CF, 0xA9DA, 0xA9DE,
    0xA9FF, 0xAA00, 0xAA37, 0xAA40, 0xAA4E, 0xAA50, 0xAA5A, 0xAA5C, 0xAAC3, 0xAADB, 0xAAF7, 0xAB01,
    0xAB07, 0xAB09, 0xAB0F, 0xAB11, 0xAB17, 0xAB20, 0xAB27, 0xAB28, 0xAB2F, 0xAB30, 0xAB6C, 0xAB70,
    0xABEE, 0xABF0, 0xABFA, 0xAC00, 0xD7A4, 0xD7B0, 0xD7C7, 0xD7CB, 0xD7FC, 0xF900, 0xFA6E, 0xFA70,
    0xFADA, 0xFB00, 0xFB07, 0xFB13, 0xFB18, 0xFB1D, 0xFB37, 0xFB38, 0xFB3D, 0xFB3E, 0xFB3F, 0xFB40,
    0xFB42, 0xFB43, 0xFB45, 0xFB46, 0xFBC3, 0xFBD3, 0xFD90, 0xFD92, 0xFDC8, 0xFDCF, 0xFDD0, 0xFDF0,
    0xFE1A, 0xFE20, 0xFE53, 0xFE54, 0xFE67, 0xFE68, 0xFE6C, 0xFE70, 0xFE75, 0xFE76, 0xFEFD, 0xFF01,
    0xFFBF, 0xFFC2, 0xFFC8, 0xFFCA, 0xFFD0, 0xFFD2, 0xFFD8, 0xFFDA, 0xFFDD, 0xFFE0, 0xFFE7, 0xFFE8,
    0xFFEF, 0xFFFC, 0xFFFE, 0x10000, 0x1000C, 0x1000D, 0x10027, 0x10028, 0x1003B, 0x1003C, 0x1003E,
    0x1003F, 0x1004E, 0x10050, 0x1005E, 0x10080, 0x100FB, 0x10100, 0x10103, 0x10107, 0x10134,
    0x10137, 0x1018F, 0x10190, 0x1019D, 0x101A0, 0x101A1, 0x101D0, 0x101FE, 0x10280, 0x1029D,
    0x102A0, 0x102D1, 0x102E0, 0x102FC, 0x10300, 0x10324, 0x1032D, 0x1034B, 0x10350, 0x1037B,
    0x10380, 0x1039E, 0x1039F, 0x103C4, 0x103C8, 0x103D6, 0x10400, 0x1049E, 0x104A0, 0x104AA,
    0x104B0, 0x104D4, 0x104D8, 0x104FC, 0x10500, 0x10528, 0x10530, 0x10564, 0x1056F, 0x1057B,
    0x1057C, 0x1058B, 0x1058C, 0x10593, 0x10594, 0x10596, 0x10597, 0x105A2, 0x105A3, 0x105B2,
    0x105B3, 0x105BA, 0x105BB, 0x105BD, 0x10600, 0x10737, 0x10740, 0x10756, 0x10760, 0x10768,
    0x10780, 0x10786, 0x10787, 0x107B1, 0x107B2, 0x107BB, 0x10800, 0x10806, 0x10808, 0x10809,
    0x1080A, 0x10836, 0x10837, 0x10839, 0x1083C, 0x1083D, 0x1083F, 0x10856, 0x10857, 0x1089F,
    0x108A7, 0x108B0, 0x108E0, 0x108F3, 0x108F4, 0x108F6, 0x108FB, 0x1091C, 0x1091F, 0x1093A,
    0x1093F, 0x10940, 0x10980, 0x109B8, 0x109BC, 0x109D0, 0x109D2, 0x10A04, 0x10A05, 0x10A07,
    0x10A0C, 0x10A14, 0x10A15, 0x10A18, 0x10A19, 0x10A36, 0x10A38, 0x10A3B, 0x10A3F, 0x10A49,
    0x10A50, 0x10A59, 0x10A60, 0x10AA0, 0x10AC0, 0x10AE7, 0x10AEB, 0x10AF7, 0x10B00, 0x10B36,
    0x10B39, 0x10B56, 0x10B58, 0x10B73, 0x10B78, 0x10B92, 0x10B99, 0x10B9D, 0x10BA9, 0x10BB0,
    0x10C00, 0x10C49, 0x10C80, 0x10CB3, 0x10CC0, 0x10CF3, 0x10CFA, 0x10D28, 0x10D30, 0x10D3A,
    0x10E60, 0x10E7F, 0x10E80, 0x10EAA, 0x10EAB, 0x10EAE, 0x10EB0, 0x10EB2, 0x10F00, 0x10F28,
    0x10F30, 0x10F5A, 0x10F70, 0x10F8A, 0x10FB0, 0x10FCC, 0x10FE0, 0x10FF7, 0x11000, 0x1104E,
    0x11052, 0x11076, 0x1107F, 0x110BD, 0x110BE, 0x110C3, 0x110D0, 0x110E9, 0x110F0, 0x110FA,
    0x11100, 0x11135, 0x11136, 0x11148, 0x11150, 0x11177, 0x11180, 0x111E0, 0x111E1, 0x111F5,
    0x11200, 0x11212, 0x11213, 0x1123F, 0x11280, 0x11287, 0x11288, 0x11289, 0x1128A, 0x1128E,
    0x1128F, 0x1129E, 0x1129F, 0x112AA, 0x112B0, 0x112EB, 0x112F0, 0x112FA, 0x11300, 0x11304,
    0x11305, 0x1130D, 0x1130F, 0x11311, 0x11313, 0x11329, 0x1132A, 0x11331, 0x11332, 0x11334,
    0x11335, 0x1133A, 0x1133B, 0x11345, 0x11347, 0x11349, 0x1134B, 0x1134E, 0x11350, 0x11351,
    0x11357, 0x11358, 0x1135D, 0x11364, 0x11366, 0x1136D, 0x11370, 0x11375, 0x11400, 0x1145C,
    0x1145D, 0x11462, 0x11480, 0x114C8, 0x114D0, 0x114DA, 0x11580, 0x115B6, 0x115B8, 0x115DE,
    0x11600, 0x11645, 0x11650, 0x1165A, 0x11660, 0x1166D, 0x11680, 0x116BA, 0x116C0, 0x116CA,
    0x11700, 0x1171B, 0x1171D, 0x1172C, 0x11730, 0x11747, 0x11800, 0x1183C, 0x118A0, 0x118F3,
    0x118FF, 0x11907, 0x11909, 0x1190A, 0x1190C, 0x11914, 0x11915, 0x11917, 0x11918, 0x11936,
    0x11937, 0x11939, 0x1193B, 0x11947, 0x11950, 0x1195A, 0x119A0, 0x119A8, 0x119AA, 0x119D8,
    0x119DA, 0x119E5, 0x11A00, 0x11A48, 0x11A50, 0x11AA3, 0x11AB0, 0x11AF9, 0x11C00, 0x11C09,
    0x11C0A, 0x11C37, 0x11C38, 0x11C46, 0x11C50, 0x11C6D, 0x11C70, 0x11C90, 0x11C92, 0x11CA8,
    0x11CA9, 0x11CB7, 0x11D00, 0x11D07, 0x11D08, 0x11D0A, 0x11D0B, 0x11D37, 0x11D3A, 0x11D3B,
    0x11D3C, 0x11D3E, 0x11D3F, 0x11D48, 0x11D50, 0x11D5A, 0x11D60, 0x11D66, 0x11D67, 0x11D69,
    0x11D6A, 0x11D8F, 0x11D90, 0x11D92, 0x11D93, 0x11D99, 0x11DA0, 0x11DAA, 0x11EE0, 0x11EF9,
    0x11FB0, 0x11FB1, 0x11FC0, 0x11FF2, 0x11FFF, 0x1239A, 0x12400, 0x1246F, 0x12470, 0x12475,
    0x12480, 0x12544, 0x12F90, 0x12FF3, 0x13000, 0x1342F, 0x14400, 0x14647, 0x16800, 0x16A39,
    0x16A40, 0x16A5F, 0x16A60, 0x16A6A, 0x16A6E, 0x16ABF, 0x16AC0, 0x16ACA, 0x16AD0, 0x16AEE,
    0x16AF0, 0x16AF6, 0x16B00, 0x16B46, 0x16B50, 0x16B5A, 0x16B5B, 0x16B62, 0x16B63, 0x16B78,
    0x16B7D, 0x16B90, 0x16E40, 0x16E9B, 0x16F00, 0x16F4B, 0x16F4F, 0x16F88, 0x16F8F, 0x16FA0,
    0x16FE0, 0x16FE5, 0x16FF0, 0x16FF2, 0x17000, 0x187F8, 0x18800, 0x18CD6, 0x18D00, 0x18D09,
    0x1AFF0, 0x1AFF4, 0x1AFF5, 0x1AFFC, 0x1AFFD, 0x1AFFF, 0x1B000, 0x1B123, 0x1B150, 0x1B153,
    0x1B164, 0x1B168, 0x1B170, 0x1B2FC, 0x1BC00, 0x1BC6B, 0x1BC70, 0x1BC7D, 0x1BC80, 0x1BC89,
    0x1BC90, 0x1BC9A, 0x1BC9C, 0x1BCA0, 0x1CF00, 0x1CF2E, 0x1CF30, 0x1CF47, 0x1CF50, 0x1CFC4,
    0x1D000, 0x1D0F6, 0x1D100, 0x1D127, 0x1D129, 0x1D173, 0x1D17B, 0x1D1EB, 0x1D200, 0x1D246,
    0x1D2E0, 0x1D2F4, 0x1D300, 0x1D357, 0x1D360, 0x1D379, 0x1D400, 0x1D455, 0x1D456, 0x1D49D,
    0x1D49E, 0x1D4A0, 0x1D4A2, 0x1D4A3, 0x1D4A5, 0x1D4A7, 0x1D4A9, 0x1D4AD, 0x1D4AE, 0x1D4BA,
    0x1D4BB, 0x1D4BC, 0x1D4BD, 0x1D4C4, 0x1D4C5, 0x1D506, 0x1D507, 0x1D50B, 0x1D50D, 0x1D515,
    0x1D516, 0x1D51D, 0x1D51E, 0x1D53A, 0x1D53B, 0x1D53F, 0x1D540, 0x1D545, 0x1D546, 0x1D547,
    0x1D54A, 0x1D551, 0x1D552, 0x1D6A6, 0x1D6A8, 0x1D7CC, 0x1D7CE, 0x1DA8C, 0x1DA9B, 0x1DAA0,
    0x1DAA1, 0x1DAB0, 0x1DF00, 0x1DF1F, 0x1E000, 0x1E007, 0x1E008, 0x1E019, 0x1E01B, 0x1E022,
    0x1E023, 0x1E025, 0x1E026, 0x1E02B, 0x1E100, 0x1E12D, 0x1E130, 0x1E13E, 0x1E140, 0x1E14A,
    0x1E14E, 0x1E150, 0x1E290, 0x1E2AF, 0x1E2C0, 0x1E2FA, 0x1E2FF, 0x1E300, 0x1E7E0, 0x1E7E7,
    0x1E7E8, 0x1E7EC, 0x1E7ED, 0x1E7EF, 0x1E7F0, 0x1E7FF, 0x1E800, 0x1E8C5, 0x1E8C7, 0x1E8D7,
    0x1E900, 0x1E94C, 0x1E950, 0x1E95A, 0x1E95E, 0x1E960, 0x1EC71, 0x1ECB5, 0x1ED01, 0x1ED3E,
    0x1EE00, 0x1EE04, 0x1EE05, 0x1EE20, 0x1EE21, 0x1EE23, 0x1EE24, 0x1EE25, 0x1EE27, 0x1EE28,
    0x1EE29, 0x1EE33, 0x1EE34, 0x1EE38, 0x1EE39, 0x1EE3A, 0x1EE3B, 0x1EE3C, 0x1EE42, 0x1EE43,
    0x1EE47, 0x1EE48, 0x1EE49, 0x1EE4A, 0x1EE4B, 0x1EE4C, 0x1EE4D, 0x1EE50, 0x1EE51, 0x1EE53,
    0x1EE54, 0x1EE55, 0x1EE57, 0x1EE58, 0x1EE59, 0x1EE5A, 0x1EE5B, 0x1EE5C, 0x1EE5D, 0x1EE5E,
    0x1EE5F, 0x1EE60, 0x1EE61, 0x1EE63, 0x1EE64, 0x1EE65, 0x1EE67, 0x1EE6B, 0x1EE6C, 0x1EE73,
    0x1EE74, 0x1EE78, 0x1EE79, 0x1EE7D, 0x1EE7E, 0x1EE7F, 0x1EE80, 0x1EE8A, 0x1EE8B, 0x1EE9C,
    0x1EEA1, 0x1EEA4, 0x1EEA5, 0x1EEAA, 0x1EEAB, 0x1EEBC, 0x1EEF0, 0x1EEF2, 0x1F000, 0x1F02C,
    0x1F030, 0x1F094, 0x1F0A0, 0x1F0AF, 0x1F0B1, 0x1F0C0, 0x1F0C1, 0x1F0D0, 0x1F0D1, 0x1F0F6,
    0x1F100, 0x1F1AE, 0x1F1E6, 0x1F203, 0x1F210, 0x1F23C, 0x1F240, 0x1F249, 0x1F250, 0x1F252,
    0x1F260, 0x1F266, 0x1F300, 0x1F6D8, 0x1F6DD, 0x1F6ED, 0x1F6F0, 0x1F6FD, 0x1F700, 0x1F774,
    0x1F780, 0x1F7D9, 0x1F7E0, 0x1F7EC, 0x1F7F0, 0x1F7F1, 0x1F800, 0x1F80C, 0x1F810, 0x1F848,
    0x1F850, 0x1F85A, 0x1F860, 0x1F888, 0x1F890, 0x1F8AE, 0x1F8B0, 0x1F8B2, 0x1F900, 0x1FA54,
    0x1FA60, 0x1FA6E, 0x1FA70, 0x1FA75, 0x1FA78, 0x1FA7D, 0x1FA80, 0x1FA87, 0x1FA90, 0x1FAAD,
    0x1FAB0, 0x1FABB, 0x1FAC0, 0x1FAC6, 0x1FAD0, 0x1FADA, 0x1FAE0, 0x1FAE8, 0x1FAF0, 0x1FAF7,
    0x1FB00, 0x1FB93, 0x1FB94, 0x1FBCB, 0x1FBF0, 0x1FBFA, 0x20000, 0x2A6E0, 0x2A700, 0x2B739,
    0x2B740, 0x2B81E, 0x2B820, 0x2CEA2, 0x2CEB0, 0x2EBE1, 0x2F800, 0x2FA1E, 0x30000, 0x3134B,
    0xE0100, 0xE01F0, 0x110000,
];

// ---------------------------------------------------------------------------
// Decoding errors (json.loads)
// ---------------------------------------------------------------------------

/// Deepest container nesting the reference CLI decodes before CPython raises
/// `RecursionError`.
///
/// Why this number: in 3.11 the C scanner charges each `[`/`{` against the
/// same budget (`sys.getrecursionlimit()`, 1000) as Python frames, so the
/// limit depends on the caller's stack. Both reference entry points that
/// decode user input (`millracer ops --json` via `_loads_object`, and
/// `millracer run --benchmark-json` via `parse_benchmark_request`) sit 8
/// frames deep, and were measured to accept 991 nested arrays and reject 992.
const MAX_NESTING: usize = 991;

/// CPython's default `sys.get_int_max_str_digits()`.
const INT_MAX_STR_DIGITS: usize = 4300;

/// Why a scan stopped; mirrors the three ways the C scanner can fail.
enum Fail {
    /// `StopIteration(pos)`: no value starts at `pos`. `raw_decode` turns
    /// it into `Expecting value` at that (possibly nested) position.
    StopIteration(usize),
    /// A `JSONDecodeError` raised directly with this message and position.
    Decode(&'static str, usize),
    /// Any other `ValueError`, whose message carries no position.
    Plain(String),
}

/// `JSONDecodeError.__init__`'s message: `'%s: line %d column %d (char %d)'`
/// with `lineno = doc.count('\n', 0, pos) + 1` and
/// `colno = pos - doc.rfind('\n', 0, pos)`, all in code points.
fn format_error(chars: &[char], msg: &str, pos: usize) -> String {
    let before = chars.get(..pos).unwrap_or(chars);
    let lineno = before.iter().filter(|c| **c == '\n').count() + 1;
    let colno = match before.iter().rposition(|c| *c == '\n') {
        Some(nl) => pos - nl,
        None => pos + 1,
    };
    format!("{msg}: line {lineno} column {colno} (char {pos})")
}

/// A validating re-implementation of `_json.c`'s `scan_once_unicode` and
/// helpers. Indices are code-point offsets into `s`, as in Python.
struct Scanner<'a> {
    s: &'a [char],
}

#[derive(Clone, Copy)]
enum Container {
    Array,
    Object,
}

impl Scanner<'_> {
    fn at(&self, idx: usize) -> Option<char> {
        self.s.get(idx).copied()
    }

    /// JSON whitespace for Python is exactly `[ \t\n\r]`.
    fn skip_ws(&self, mut idx: usize) -> usize {
        while matches!(self.at(idx), Some(' ' | '\t' | '\n' | '\r')) {
            idx += 1;
        }
        idx
    }

    fn starts_with(&self, idx: usize, lit: &str) -> bool {
        lit.chars()
            .enumerate()
            .all(|(offset, expected)| self.at(idx + offset) == Some(expected))
    }

    /// Scans one value starting exactly at `idx` (no leading whitespace
    /// skipped, as in `scan_once`) and returns the index just past it.
    ///
    /// Iterative with an explicit container stack so that no input can
    /// exhaust the Rust stack, whatever thread calls us.
    fn scan(&self, mut idx: usize) -> Result<usize, Fail> {
        let mut stack: Vec<Container> = Vec::new();
        'value: loop {
            // A value must start at `idx`.
            match self.at(idx) {
                None => return Err(Fail::StopIteration(idx)),
                Some('"') => idx = self.scan_string(idx + 1)?,
                Some(open @ ('[' | '{')) => {
                    let (kind, close, what) = if open == '[' {
                        (Container::Array, ']', "array")
                    } else {
                        (Container::Object, '}', "object")
                    };
                    if stack.len() >= MAX_NESTING {
                        return Err(Fail::Plain(format!(
                            "maximum recursion depth exceeded while decoding a JSON {what} \
                             from a unicode string"
                        )));
                    }
                    idx = self.skip_ws(idx + 1);
                    if self.at(idx) == Some(close) {
                        idx += 1;
                    } else {
                        stack.push(kind);
                        if let Container::Object = kind {
                            idx = self.scan_key_and_colon(idx)?;
                        }
                        continue 'value;
                    }
                }
                Some('n') if self.starts_with(idx, "null") => idx += 4,
                Some('t') if self.starts_with(idx, "true") => idx += 4,
                Some('f') if self.starts_with(idx, "false") => idx += 5,
                Some('N') if self.starts_with(idx, "NaN") => idx += 3,
                Some('I') if self.starts_with(idx, "Infinity") => idx += 8,
                Some('-') if self.starts_with(idx, "-Infinity") => idx += 9,
                Some(_) => idx = self.match_number(idx)?,
            }
            // A value ended at `idx`: let the enclosing containers react.
            loop {
                let Some(&top) = stack.last() else {
                    return Ok(idx);
                };
                let close = match top {
                    Container::Array => ']',
                    Container::Object => '}',
                };
                idx = self.skip_ws(idx);
                match self.at(idx) {
                    Some(c) if c == close => {
                        stack.pop();
                        idx += 1;
                    }
                    Some(',') => {
                        idx = self.skip_ws(idx + 1);
                        if let Container::Object = top {
                            idx = self.scan_key_and_colon(idx)?;
                        }
                        continue 'value;
                    }
                    _ => return Err(Fail::Decode("Expecting ',' delimiter", idx)),
                }
            }
        }
    }

    /// Object member prefix: `"key"`, optional whitespace, `:`, optional
    /// whitespace. Returns the index where the member's value must start.
    fn scan_key_and_colon(&self, idx: usize) -> Result<usize, Fail> {
        if self.at(idx) != Some('"') {
            return Err(Fail::Decode(
                "Expecting property name enclosed in double quotes",
                idx,
            ));
        }
        let idx = self.skip_ws(self.scan_string(idx + 1)?);
        if self.at(idx) != Some(':') {
            return Err(Fail::Decode("Expecting ':' delimiter", idx));
        }
        Ok(self.skip_ws(idx + 1))
    }

    /// `scanstring_unicode` with `strict=True`; `start` is just past the
    /// opening quote. Reproduces the C code's quirks, e.g. a `\u` escape
    /// whose four digits reach the end of the document is reported as an
    /// invalid escape rather than an unterminated string.
    fn scan_string(&self, start: usize) -> Result<usize, Fail> {
        let begin = start - 1;
        let len = self.s.len();
        let mut end = start;
        loop {
            let mut next = end;
            let mut stop = None;
            while let Some(d) = self.at(next) {
                if d == '"' || d == '\\' {
                    stop = Some(d);
                    break;
                }
                if u32::from(d) <= 0x1f {
                    return Err(Fail::Decode("Invalid control character at", next));
                }
                next += 1;
            }
            match stop {
                Some('"') => return Ok(next + 1),
                Some(_) => {}
                None => return Err(Fail::Decode("Unterminated string starting at", begin)),
            }
            next += 1;
            let Some(esc) = self.at(next) else {
                return Err(Fail::Decode("Unterminated string starting at", begin));
            };
            if esc != 'u' {
                end = next + 1;
                if !matches!(esc, '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') {
                    return Err(Fail::Decode("Invalid \\escape", end - 2));
                }
                continue;
            }
            next += 1;
            end = next + 4;
            if end >= len {
                return Err(Fail::Decode("Invalid \\uXXXX escape", next - 1));
            }
            let unit = self
                .hex4(next)
                .ok_or(Fail::Decode("Invalid \\uXXXX escape", end - 5))?;
            if (0xd800..0xdc00).contains(&unit)
                && end + 6 < len
                && self.at(end) == Some('\\')
                && self.at(end + 1) == Some('u')
            {
                // A second escape directly after a high surrogate is decoded
                // eagerly, so its digits are validated here; if it is not a
                // low surrogate it is re-scanned as an ordinary escape.
                let second = self
                    .hex4(end + 2)
                    .ok_or(Fail::Decode("Invalid \\uXXXX escape", end + 1))?;
                if (0xdc00..0xe000).contains(&second) {
                    end += 6;
                }
            }
        }
    }

    /// Four hex digits (either case) starting at `idx`.
    fn hex4(&self, idx: usize) -> Option<u32> {
        let mut value = 0;
        for i in idx..idx + 4 {
            value = value * 16 + self.at(i)?.to_digit(16)?;
        }
        Some(value)
    }

    /// `_match_number_unicode`: the regex
    /// `(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?` anchored at `start`,
    /// failing with `StopIteration(start)`. Integers are converted with
    /// `int()`, which enforces the 4300-digit limit.
    fn match_number(&self, start: usize) -> Result<usize, Fail> {
        let is_digit = |i: usize| self.at(i).is_some_and(|c| c.is_ascii_digit());
        let mut idx = start;
        if self.at(idx) == Some('-') {
            idx += 1;
        }
        let int_start = idx;
        match self.at(idx) {
            Some('0') => idx += 1,
            Some('1'..='9') => {
                idx += 1;
                while is_digit(idx) {
                    idx += 1;
                }
            }
            _ => return Err(Fail::StopIteration(start)),
        }
        let int_digits = idx - int_start;
        let mut is_float = false;
        if self.at(idx) == Some('.') && is_digit(idx + 1) {
            is_float = true;
            idx += 2;
            while is_digit(idx) {
                idx += 1;
            }
        }
        if matches!(self.at(idx), Some('e' | 'E')) {
            let mut exp = idx + 1;
            if matches!(self.at(exp), Some('+' | '-')) {
                exp += 1;
            }
            if is_digit(exp) {
                is_float = true;
                idx = exp;
                while is_digit(idx) {
                    idx += 1;
                }
            }
        }
        if !is_float && int_digits > INT_MAX_STR_DIGITS {
            return Err(Fail::Plain(format!(
                "Exceeds the limit ({INT_MAX_STR_DIGITS} digits) for integer string \
                 conversion: value has {int_digits} digits; use \
                 sys.set_int_max_str_digits() to increase the limit"
            )));
        }
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    //! Expected strings were produced by CPython 3.11.7 (`json.dumps`,
    //! `json.loads`, `str()`), with `json.loads` called from the same stack
    //! depth as the reference CLI, and are hard-coded so CI needs no Python.

    use super::*;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("test document must be valid JSON")
    }

    const DECODE_CASES: &[(&str, Option<&str>)] = &[
        ("", Some("Expecting value: line 1 column 1 (char 0)")),
        ("   ", Some("Expecting value: line 1 column 4 (char 3)")),
        ("\n\n  ", Some("Expecting value: line 3 column 3 (char 4)")),
        (
            "{",
            Some("Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ),
        (
            "{\"a\"",
            Some("Expecting ':' delimiter: line 1 column 5 (char 4)"),
        ),
        (
            "{\"a\" 1}",
            Some("Expecting ':' delimiter: line 1 column 6 (char 5)"),
        ),
        ("{\"a\":", Some("Expecting value: line 1 column 6 (char 5)")),
        (
            "{\"a\":1",
            Some("Expecting ',' delimiter: line 1 column 7 (char 6)"),
        ),
        (
            "{\"a\":1,",
            Some("Expecting property name enclosed in double quotes: line 1 column 8 (char 7)"),
        ),
        (
            "{\"a\":1,}",
            Some("Expecting property name enclosed in double quotes: line 1 column 8 (char 7)"),
        ),
        (
            "{'a':1}",
            Some("Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ),
        (
            "{1:2}",
            Some("Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ),
        (
            "[1 2]",
            Some("Expecting ',' delimiter: line 1 column 4 (char 3)"),
        ),
        ("[1,]", Some("Expecting value: line 1 column 4 (char 3)")),
        ("[,1]", Some("Expecting value: line 1 column 2 (char 1)")),
        ("[", Some("Expecting value: line 1 column 2 (char 1)")),
        ("]", Some("Expecting value: line 1 column 1 (char 0)")),
        (
            "\"abc",
            Some("Unterminated string starting at: line 1 column 1 (char 0)"),
        ),
        (
            "\"a\nb\"",
            Some("Invalid control character at: line 1 column 3 (char 2)"),
        ),
        (
            "\"tab\there\"",
            Some("Invalid control character at: line 1 column 5 (char 4)"),
        ),
        (
            "\"\\x\"",
            Some("Invalid \\escape: line 1 column 2 (char 1)"),
        ),
        (
            "\"\\",
            Some("Unterminated string starting at: line 1 column 1 (char 0)"),
        ),
        (
            "\"\\u12\"",
            Some("Invalid \\uXXXX escape: line 1 column 3 (char 2)"),
        ),
        (
            "\"\\u12zz\"",
            Some("Invalid \\uXXXX escape: line 1 column 3 (char 2)"),
        ),
        (
            "\"\\u1234",
            Some("Invalid \\uXXXX escape: line 1 column 3 (char 2)"),
        ),
        (
            "\"\\ud800\\uzzzz\"",
            Some("Invalid \\uXXXX escape: line 1 column 9 (char 8)"),
        ),
        (
            "\"\\ud83d\\ude00",
            Some("Invalid \\uXXXX escape: line 1 column 9 (char 8)"),
        ),
        (
            "\"\\U0041\"",
            Some("Invalid \\escape: line 1 column 2 (char 1)"),
        ),
        (
            "[\"\\u00zz\"]",
            Some("Invalid \\uXXXX escape: line 1 column 4 (char 3)"),
        ),
        ("1 2", Some("Extra data: line 1 column 3 (char 2)")),
        ("{} x", Some("Extra data: line 1 column 4 (char 3)")),
        (
            "\u{feff}{}",
            Some("Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)"),
        ),
        (
            "\u{feff}",
            Some("Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)"),
        ),
        (
            "  \u{feff}1",
            Some("Expecting value: line 1 column 3 (char 2)"),
        ),
        ("-", Some("Expecting value: line 1 column 1 (char 0)")),
        ("-x", Some("Expecting value: line 1 column 1 (char 0)")),
        ("01", Some("Extra data: line 1 column 2 (char 1)")),
        ("1.", Some("Extra data: line 1 column 2 (char 1)")),
        ("1e+", Some("Extra data: line 1 column 2 (char 1)")),
        ("1e5x", Some("Extra data: line 1 column 4 (char 3)")),
        (
            "[1.5.3]",
            Some("Expecting ',' delimiter: line 1 column 5 (char 4)"),
        ),
        ("nul", Some("Expecting value: line 1 column 1 (char 0)")),
        ("True", Some("Expecting value: line 1 column 1 (char 0)")),
        ("nan", Some("Expecting value: line 1 column 1 (char 0)")),
        ("-Inf", Some("Expecting value: line 1 column 1 (char 0)")),
        ("-Infinityx", Some("Extra data: line 1 column 10 (char 9)")),
        ("[-]", Some("Expecting value: line 1 column 2 (char 1)")),
        ("\u{b}1", Some("Expecting value: line 1 column 1 (char 0)")),
        ("\u{a0}1", Some("Expecting value: line 1 column 1 (char 0)")),
        ("[1]\u{a0}", Some("Extra data: line 1 column 4 (char 3)")),
        ("{\"a\":1}}", Some("Extra data: line 1 column 8 (char 7)")),
        (
            "{\"a\":1 \"b\":2}",
            Some("Expecting ',' delimiter: line 1 column 8 (char 7)"),
        ),
        (
            "{\n  \"a\": 1,\n  \"b\": [1, 2,\n  ]\n}",
            Some("Expecting value: line 4 column 3 (char 28)"),
        ),
        (
            "{\n\"a\": \"x\",\n\"b\" 2\n}",
            Some("Expecting ':' delimiter: line 3 column 5 (char 16)"),
        ),
        (
            "[\n\n\n  tru\n]",
            Some("Expecting value: line 4 column 3 (char 6)"),
        ),
        (
            "\r\n{\r\n\"a\"\r\n}",
            Some("Expecting ':' delimiter: line 4 column 1 (char 10)"),
        ),
        (
            "{\"\u{e9}\": \"\u{fc}\" \"x\"}",
            Some("Expecting ',' delimiter: line 1 column 11 (char 10)"),
        ),
        (
            "[\"\u{1f600}\u{1f600}\", ]",
            Some("Expecting value: line 1 column 8 (char 7)"),
        ),
        ("\u{e9}", Some("Expecting value: line 1 column 1 (char 0)")),
        (
            "\"h\u{e9}llo\nworld\"",
            Some("Invalid control character at: line 1 column 7 (char 6)"),
        ),
        (
            "[\n  \"ok\",\n  \"\u{1f600}\\q\"\n]",
            Some("Invalid \\escape: line 3 column 5 (char 14)"),
        ),
        (
            "\n\n\"abc\n",
            Some("Invalid control character at: line 3 column 5 (char 6)"),
        ),
        ("NaN", None),
        ("-Infinity", None),
        ("Infinity", None),
        ("[NaN, -Infinity, Infinity]", None),
        ("\"\\ud800\"", None),
        ("\"\\udc00\\ud800x\"", None),
        ("{\"a\": [1, 2.5e10, -0, true, false, null]}", None),
        (" \t\n\r[]\r\n ", None),
        ("\"\u{7f}\u{2028}\"", None),
        ("1E5", None),
        ("-0.0e-0", None),
        ("\"\\/\\b\\f\\n\\r\\t\\\"\\\\\"", None),
        ("{\"a\":1,\"a\":2}", None),
    ];
    const DUMPS_CASES: &[(&str, &str, &str)] = &[
        (
            "{\"b\": 1, \"a\": [1, 2.5, \"x\"], \"c\": {}, \"d\": [], \"e\": {\"z\": null, \"y\": true, \"x\": false}}",
            "{\n  \"a\": [\n    1,\n    2.5,\n    \"x\"\n  ],\n  \"b\": 1,\n  \"c\": {},\n  \"d\": [],\n  \"e\": {\n    \"x\": false,\n    \"y\": true,\n    \"z\": null\n  }\n}",
            "{\"a\":[1,2.5,\"x\"],\"b\":1,\"c\":{},\"d\":[],\"e\":{\"x\":false,\"y\":true,\"z\":null}}",
        ),
        ("[]", "[]", "[]"),
        ("{}", "{}", "{}"),
        ("\"plain\"", "\"plain\"", "\"plain\""),
        ("null", "null", "null"),
        ("true", "true", "true"),
        ("0", "0", "0"),
        ("-5", "-5", "-5"),
        (
            "18446744073709551615",
            "18446744073709551615",
            "18446744073709551615",
        ),
        (
            "-9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775808",
        ),
        ("0.5", "0.5", "0.5"),
        ("[[]]", "[\n  []\n]", "[[]]"),
        ("[{}]", "[\n  {}\n]", "[{}]"),
        (
            "\"\\u00e9 \\u00fc \\ud83d\\ude00 \\u2028 \\u00ad \\u007f \\u0000 \\u001f \\u001b \\b \\f \\n \\r \\t \\\" \\\\ / ' \\ufeff \\udbff\\udfff\"",
            "\"\\u00e9 \\u00fc \\ud83d\\ude00 \\u2028 \\u00ad \\u007f \\u0000 \\u001f \\u001b \\b \\f \\n \\r \\t \\\" \\\\ / ' \\ufeff \\udbff\\udfff\"",
            "\"\\u00e9 \\u00fc \\ud83d\\ude00 \\u2028 \\u00ad \\u007f \\u0000 \\u001f \\u001b \\b \\f \\n \\r \\t \\\" \\\\ / ' \\ufeff \\udbff\\udfff\"",
        ),
        (
            "{\"b\": 1, \"B\": 2, \"a\": 3, \"\\u00e9\": 4, \"\\ud83d\\ude00\": 5, \"\\uffff\": 6, \"_\": 7, \"aa\": 8, \"\": 9, \"a\\u0000\": 10}",
            "{\n  \"\": 9,\n  \"B\": 2,\n  \"_\": 7,\n  \"a\": 3,\n  \"a\\u0000\": 10,\n  \"aa\": 8,\n  \"b\": 1,\n  \"\\u00e9\": 4,\n  \"\\uffff\": 6,\n  \"\\ud83d\\ude00\": 5\n}",
            "{\"\":9,\"B\":2,\"_\":7,\"a\":3,\"a\\u0000\":10,\"aa\":8,\"b\":1,\"\\u00e9\":4,\"\\uffff\":6,\"\\ud83d\\ude00\":5}",
        ),
        (
            "[[[]], [{}], [[1]], {\"k\": [{\"x\": [null]}]}]",
            "[\n  [\n    []\n  ],\n  [\n    {}\n  ],\n  [\n    [\n      1\n    ]\n  ],\n  {\n    \"k\": [\n      {\n        \"x\": [\n          null\n        ]\n      }\n    ]\n  }\n]",
            "[[[]],[{}],[[1]],{\"k\":[{\"x\":[null]}]}]",
        ),
        (
            "{\"outer\": {\"inner\": {\"list\": [1, {\"deep\": \"v\"}], \"n\": -0.25}}, \"arr\": [true, false, null, \"s\", 3]}",
            "{\n  \"arr\": [\n    true,\n    false,\n    null,\n    \"s\",\n    3\n  ],\n  \"outer\": {\n    \"inner\": {\n      \"list\": [\n        1,\n        {\n          \"deep\": \"v\"\n        }\n      ],\n      \"n\": -0.25\n    }\n  }\n}",
            "{\"arr\":[true,false,null,\"s\",3],\"outer\":{\"inner\":{\"list\":[1,{\"deep\":\"v\"}],\"n\":-0.25}}}",
        ),
    ];
    const PY_STR_CASES: &[(&str, &str)] = &[
        ("null", "None"),
        ("true", "True"),
        ("false", "False"),
        ("1", "1"),
        ("-1", "-1"),
        ("18446744073709551615", "18446744073709551615"),
        ("1.0", "1.0"),
        ("0.5", "0.5"),
        ("\"text\"", "text"),
        ("\"it's\"", "it's"),
        ("\"line\\nbreak\"", "line\nbreak"),
        ("\"\"", ""),
        ("[]", "[]"),
        ("{}", "{}"),
        ("[1, \"a\", null]", "[1, 'a', None]"),
        ("{\"a\": 1, \"b\": [true]}", "{'a': 1, 'b': [True]}"),
        (
            "{\"b\": 1, \"a\": [true, null], \"c\": {\"x\": 1.5}}",
            "{'b': 1, 'a': [True, None], 'c': {'x': 1.5}}",
        ),
        (
            "[\"it's\", \"say \\\"hi\\\"\", \"both ' and \\\"\", \"back\\\\slash\", \"nl\\n\", \"tab\\t\", \"cr\\r\", \"\\u0000\\u001f\\u007f\\u001b\", \"\\u00e9\", \"\\u00a0\", \"\\u00ad\", \"\\u2028\", \"\\ud83d\\ude00\", \"\\udb40\\udc01\", \"\\u0378\", \"\\ufeff\", \"\\u0085\", \"\\u3000\", \"\\ue000\", \"\\udbff\\udfff\", \"\\u65e5\\u672c\"]",
            "[\"it's\", 'say \"hi\"', 'both \\' and \"', 'back\\\\slash', 'nl\\n', 'tab\\t', 'cr\\r', '\\x00\\x1f\\x7f\\x1b', '\u{e9}', '\\xa0', '\\xad', '\\u2028', '\u{1f600}', '\\U000e0001', '\\u0378', '\\ufeff', '\\x85', '\\u3000', '\\ue000', '\\U0010ffff', '\u{65e5}\u{672c}']",
        ),
        (
            "{\"it's\": [\"x\"], \"k\\n\": {\"\\\"\": \"'\"}}",
            "{\"it's\": ['x'], 'k\\n': {'\"': \"'\"}}",
        ),
        ("[[[]], [{}], [{\"a\": {}}]]", "[[[]], [{}], [{'a': {}}]]"),
    ];
    const FLOAT_CASES: &[(f64, &str)] = &[
        (1.0, "1.0"),
        (0.1, "0.1"),
        (1e-05, "1e-05"),
        (0.0001, "0.0001"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (9999999999999998.0, "9999999999999998.0"),
        (1.5e300, "1.5e+300"),
        (-0.0, "-0.0"),
        (0.0, "0.0"),
        (123456789.125, "123456789.125"),
        (2.5e-7, "2.5e-07"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (2.2250738585072014e-308, "2.2250738585072014e-308"),
        (0.30000000000000004, "0.30000000000000004"),
        (581_195_753_437_852.0 + 0.25, "581195753437852.2"),
        (581_195_753_437_852.0 + 0.75, "581195753437852.8"),
        (-119_239_789_053_249.0 - 0.125, "-119239789053249.12"),
        (1e22, "1e+22"),
        (1e23, "1e+23"),
        (100.0, "100.0"),
        (-1.5, "-1.5"),
        (std::f64::consts::PI, "3.141592653589793"),
        (1234567890123456.8, "1234567890123456.8"),
        (0.000123, "0.000123"),
        (123e-20, "1.23e-18"),
    ];

    const INT_LIMIT_4301: &str = "Exceeds the limit (4300 digits) for integer string conversion: \
        value has 4301 digits; use sys.set_int_max_str_digits() to increase the limit";
    const DEEP_ARRAY: &str =
        "maximum recursion depth exceeded while decoding a JSON array from a unicode string";
    const DEEP_OBJECT: &str =
        "maximum recursion depth exceeded while decoding a JSON object from a unicode string";

    #[test]
    fn decode_error_matches_python() {
        assert!(DECODE_CASES.len() >= 40);
        for (input, expected) in DECODE_CASES {
            assert_eq!(
                decode_error(input).as_deref(),
                *expected,
                "input: {input:?}"
            );
        }
    }

    #[test]
    fn decode_error_integer_digit_limit() {
        let digits = "1".repeat(4301);
        let cases: Vec<(String, Option<&str>)> = vec![
            (digits.clone(), Some(INT_LIMIT_4301)),
            (format!("[{digits}]"), Some(INT_LIMIT_4301)),
            (format!("-{digits}"), Some(INT_LIMIT_4301)),
            ("1".repeat(4300), None),
            (format!("{}.5", "1".repeat(4300)), None),
            (format!("{digits}e1"), None),
            (format!("{digits}.5"), None),
            (
                format!("[1, 2, {}, x]", "9".repeat(5000)),
                Some(
                    "Exceeds the limit (4300 digits) for integer string conversion: \
                     value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit",
                ),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                decode_error(&input).as_deref(),
                expected,
                "len {}",
                input.len()
            );
        }
    }

    #[test]
    fn decode_error_recursion_depth() {
        let nest = |open: &str, inner: &str, close: &str, n: usize| {
            format!("{}{}{}", open.repeat(n), inner, close.repeat(n))
        };
        let cases: Vec<(String, Option<&str>)> = vec![
            (nest("[", "", "]", 991), None),
            (nest("[", "", "]", 992), Some(DEEP_ARRAY)),
            (nest("{\"a\":", "1", "}", 991), None),
            (nest("{\"a\":", "1", "}", 992), Some(DEEP_OBJECT)),
            (nest("[", "{}", "]", 990), None),
            (nest("[", "{}", "]", 991), Some(DEEP_OBJECT)),
            (nest("[", "[]", "]", 991), Some(DEEP_ARRAY)),
            (format!("{}[ ]", "[".repeat(991)), Some(DEEP_ARRAY)),
            (format!("{}[[", "[{\"a\":".repeat(495)), Some(DEEP_ARRAY)),
            (format!("{}[]", "[{\"a\":".repeat(496)), Some(DEEP_OBJECT)),
            ("[".repeat(2000), Some(DEEP_ARRAY)),
            (format!("{}\"\\x", "[".repeat(992)), Some(DEEP_ARRAY)),
            (
                format!("{}x", "[".repeat(500)),
                Some("Expecting value: line 1 column 501 (char 500)"),
            ),
            ("[".repeat(100_000), Some(DEEP_ARRAY)),
        ];
        for (input, expected) in cases {
            assert_eq!(
                decode_error(&input).as_deref(),
                expected,
                "len {}",
                input.len()
            );
        }
    }

    #[test]
    fn to_pretty_and_to_line_match_json_dumps() {
        for (doc, pretty, line) in DUMPS_CASES {
            let value = parse(doc);
            assert_eq!(to_pretty(&value), *pretty, "doc: {doc}");
            assert_eq!(to_line(&value), *line, "doc: {doc}");
        }
    }

    #[test]
    fn dumps_escapes_every_non_ascii_and_control_char() {
        let value = Value::String(
            "\u{0}\u{1}\u{8}\u{9}\u{a}\u{c}\u{d}\u{1f} ~\u{7f}\u{80}\u{ffff}\u{10000}".into(),
        );
        assert_eq!(
            to_line(&value),
            "\"\\u0000\\u0001\\b\\t\\n\\f\\r\\u001f ~\\u007f\\u0080\\uffff\\ud800\\udc00\""
        );
    }

    #[test]
    fn floats_match_python_repr() {
        for (f, expected) in FLOAT_CASES {
            let value = Value::from(*f);
            assert_eq!(to_line(&value), *expected, "float {f:e}");
            assert_eq!(py_str(&value), *expected, "float {f:e}");
        }
        let list = Value::from(vec![1.0, 1e-5, 1e16, -0.0]);
        assert_eq!(to_line(&list), "[1.0,1e-05,1e+16,-0.0]");
        assert_eq!(to_pretty(&list), "[\n  1.0,\n  1e-05,\n  1e+16,\n  -0.0\n]");
        assert_eq!(py_str(&list), "[1.0, 1e-05, 1e+16, -0.0]");
    }

    #[test]
    fn integers_stay_integers() {
        assert_eq!(to_line(&Value::from(u64::MAX)), "18446744073709551615");
        assert_eq!(to_line(&Value::from(i64::MIN)), "-9223372036854775808");
        assert_eq!(to_line(&Value::from(0)), "0");
        assert_eq!(py_str(&Value::from(-42)), "-42");
    }

    #[test]
    fn py_str_matches_python_str() {
        for (doc, expected) in PY_STR_CASES {
            assert_eq!(py_str(&parse(doc)), *expected, "doc: {doc}");
        }
    }

    #[test]
    fn py_str_printability_table_edges() {
        let value = Value::from(vec![
            "\u{a0}\u{a1}\u{ac}\u{ad}\u{ae}\u{377}\u{378}\u{3000}\u{e000}\u{f8ff}\u{f900}",
            "\u{1f600}\u{e0100}\u{e01ef}\u{e01f0}\u{10ffff}\u{fffd}\u{fffe}",
        ]);
        assert_eq!(
            py_str(&value),
            "['\\xa0\u{a1}\u{ac}\\xad\u{ae}\u{377}\\u0378\\u3000\\ue000\\uf8ff\u{f900}', \
             '\u{1f600}\u{e0100}\u{e01ef}\\U000e01f0\\U0010ffff\u{fffd}\\ufffe']"
        );
    }

    /// xorshift64*: deterministic, dependency-free noise for the fuzz test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn decode_error_never_panics_and_agrees_with_serde() {
        const TOKENS: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "\n",
            "\t",
            "\r",
            "\"",
            "\\",
            "\"a\"",
            "1",
            "-",
            "0",
            ".",
            "e",
            "E",
            "+",
            "null",
            "true",
            "false",
            "NaN",
            "Infinity",
            "-Infinity",
            "nul",
            "\\u",
            "\\ud800",
            "\\udc00",
            "d83d",
            "12",
            "zz",
            "é",
            "😀",
            "\u{0}",
            "\u{b}",
            "\u{feff}",
            "\u{a0}",
            "x",
            "1e5",
            "01",
            "-0",
            "\"\\u00e9\"",
            "\"\\x\"",
            "\"\\n\"",
        ];
        const SEEDS: &[&str] = &[
            r#"{"a": [1, 2.5, -3e-2, "x\"y\u00e9"], "b": {"c": null, "d": true}}"#,
            r#"[{"k": "v"}, [], {}, "\ud83d\ude00", 0, -0.5, false]"#,
            "{\n  \"multi\": [\n    1,\n    \"line\"\n  ]\n}",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..5000 {
            let mut text = String::new();
            match round % 3 {
                0 => {
                    for _ in 0..rng.below(12) {
                        text.push_str(TOKENS[rng.below(TOKENS.len())]);
                    }
                }
                1 => {
                    let seed: Vec<char> = SEEDS[rng.below(SEEDS.len())].chars().collect();
                    let cut = rng.below(seed.len() + 1);
                    text = seed[..cut].iter().collect();
                }
                _ => {
                    let mut chars: Vec<char> = SEEDS[rng.below(SEEDS.len())].chars().collect();
                    for _ in 0..=rng.below(3) {
                        let at = rng.below(chars.len() + 1);
                        let token: Vec<char> = TOKENS[rng.below(TOKENS.len())].chars().collect();
                        if rng.below(2) == 0 || at == chars.len() {
                            chars.splice(at..at, token);
                        } else {
                            chars[at] = token.first().copied().unwrap_or(' ');
                        }
                    }
                    text = chars.into_iter().collect();
                }
            }
            let ours = decode_error(&text);
            if let Some(message) = &ours {
                assert!(!message.is_empty());
            }
            // serde_json accepts a strict subset of what Python accepts.
            if serde_json::from_str::<Value>(&text).is_ok() {
                assert_eq!(ours, None, "serde accepted {text:?}");
            }
        }
    }

    #[test]
    fn decode_error_handles_degenerate_inputs() {
        let cases = [
            (
                "\"",
                "Unterminated string starting at: line 1 column 1 (char 0)",
            ),
            ("\"\\u", "Invalid \\uXXXX escape: line 1 column 3 (char 2)"),
            (
                "\"\\ud800\\",
                "Unterminated string starting at: line 1 column 1 (char 0)",
            ),
            (
                "\"\\ud800\\u",
                "Invalid \\uXXXX escape: line 1 column 9 (char 8)",
            ),
            (
                "\"\\ud800\\udc0",
                "Invalid \\uXXXX escape: line 1 column 9 (char 8)",
            ),
            (
                "{\"",
                "Unterminated string starting at: line 1 column 2 (char 1)",
            ),
            (
                "{\"a",
                "Unterminated string starting at: line 1 column 2 (char 1)",
            ),
            (
                "[\"\\",
                "Unterminated string starting at: line 1 column 2 (char 1)",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(decode_error(input).as_deref(), Some(expected), "{input:?}");
        }
    }
}
