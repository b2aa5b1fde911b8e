//! A streaming tar reader for untrusted input.
//!
//! The `tar` crate's [`tar::Header`] decodes the fields of a 512-byte
//! header; this module drives the stream itself so that every size is
//! bounded: GNU long names / long links and PAX extended headers are
//! limited to [`MAX_META_SIZE`] each (the `tar` crate's own iterator reads
//! them into memory whatever their declared size), PAX `size` overrides are
//! honoured, and entry data is only ever read on request or skipped.

use std::io::{self, Read};

use tar::{EntryType, Header};

const BLOCK: usize = 512;

/// Largest accepted GNU long name, long link or PAX extended header.
pub(crate) const MAX_META_SIZE: u64 = 1 << 20;

/// Most extension headers accepted before one real entry.
const MAX_META_HEADERS: usize = 16;

/// One archive member, with GNU and PAX extensions applied.
pub(crate) struct TarEntry {
    block: [u8; BLOCK],
    /// Raw path (PAX `path`, else GNU long name, else the header's).
    pub(crate) path: Vec<u8>,
    /// Raw link target (PAX `linkpath`, else GNU long link, else the
    /// header's); `None` when empty.
    pub(crate) link: Option<Vec<u8>>,
    /// Size of the entry data.
    pub(crate) size: u64,
    /// Bytes of extension headers (long names, PAX) read for this entry.
    pub(crate) meta_size: u64,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    /// Modification time, seconds and nanoseconds.
    pub(crate) mtime: (i64, u32),
    /// `SCHILY.xattr.*` PAX records: (attribute name, value).
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl TarEntry {
    pub(crate) fn header(&self) -> &Header {
        Header::from_byte_slice(&self.block)
    }

    pub(crate) fn entry_type(&self) -> EntryType {
        self.header().entry_type()
    }

    /// The raw type flag byte.
    pub(crate) fn type_byte(&self) -> u8 {
        self.block[156]
    }

    /// Permission bits, including setuid/setgid/sticky.
    pub(crate) fn mode(&self) -> io::Result<u32> {
        numeric(&self.header().as_old().mode, "mode").map(|m| (m & 0o7777) as u32)
    }

    /// Device major and minor numbers (0 when the format has none).
    pub(crate) fn device(&self) -> io::Result<(u32, u32)> {
        let header = self.header();
        let (major, minor) = if let Some(gnu) = header.as_gnu() {
            (&gnu.dev_major, &gnu.dev_minor)
        } else if let Some(ustar) = header.as_ustar() {
            (&ustar.dev_major, &ustar.dev_minor)
        } else {
            return Ok((0, 0));
        };
        let number = |field: &[u8], what: &str| {
            numeric(field, what)
                .and_then(|v| u32::try_from(v).map_err(|_| invalid(format!("{what} out of range"))))
        };
        Ok((
            number(major, "device major")?,
            number(minor, "device minor")?,
        ))
    }
}

/// Reads tar members one at a time from a (decompressed) stream.
pub(crate) struct TarReader<R> {
    inner: R,
    /// Unread data bytes of the current entry.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    done: bool,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses a numeric header field like GNU tar and Go's archive/tar do:
/// octal digits with optional NUL/space padding (an empty field is 0), or
/// the GNU base-256 encoding when the high bit of the first byte is set.
pub(crate) fn numeric(field: &[u8], what: &str) -> io::Result<u64> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            if first == 0xff {
                return Err(invalid(format!("negative {what} field")));
            }
            let mut value: u64 = u64::from(first & 0x7f);
            for &b in &field[1..] {
                value = value
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(u64::from(b)))
                    .ok_or_else(|| invalid(format!("{what} field overflows")))?;
            }
            return Ok(value);
        }
    }
    let trimmed: &[u8] = {
        let start = field
            .iter()
            .position(|&b| b != b' ' && b != 0)
            .unwrap_or(field.len());
        let end = field[start..]
            .iter()
            .position(|&b| b == b' ' || b == 0)
            .map_or(field.len(), |i| start + i);
        &field[start..end]
    };
    let mut value: u64 = 0;
    for &b in trimmed {
        if !(b'0'..=b'7').contains(&b) {
            return Err(invalid(format!("{what} field is not an octal number")));
        }
        value = value
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(|| invalid(format!("{what} field overflows")))?;
    }
    Ok(value)
}

fn padding_for(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn checksum_ok(block: &[u8; BLOCK]) -> io::Result<bool> {
    let expected = numeric(&block[148..156], "checksum")?;
    let spaces = 8 * u32::from(b' ');
    let unsigned: u32 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|&b| u32::from(b))
        .sum::<u32>()
        + spaces;
    // Some historic writers summed signed chars.
    let signed: i64 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|&b| i64::from(b as i8))
        .sum::<i64>()
        + i64::from(spaces);
    Ok(u64::from(unsigned) == expected || u64::try_from(signed).ok() == Some(expected))
}

/// Parses PAX extended header records (`"<len> <key>=<value>\n"`),
/// honouring the length prefix so values may contain newlines.
pub(crate) fn parse_pax(data: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let bad = || invalid("malformed pax extended header");
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let digits = &rest[..space];
        if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let len: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > rest.len() {
            return Err(bad());
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").ok_or_else(bad)?;
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        records.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(records)
}

/// Last value of `key` (later records override earlier ones).
fn pax_value<'a>(records: &'a [(Vec<u8>, Vec<u8>)], key: &[u8]) -> Option<&'a [u8]> {
    records
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

fn pax_u64(records: &[(Vec<u8>, Vec<u8>)], key: &str) -> io::Result<Option<u64>> {
    match pax_value(records, key.as_bytes()) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| invalid(format!("invalid pax {key} value"))),
    }
}

/// Parses a PAX time (`"1700000000.123456789"`, possibly negative).
pub(crate) fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(b - b'0') * 10u32.pow(8 - i as u32);
    }
    if !neg {
        Some((secs, nanos))
    } else if nanos == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nanos))
    }
}

fn strip_trailing_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        TarReader {
            inner,
            remaining: 0,
            padding: 0,
            done: false,
        }
    }

    /// Discards what is left of the current entry (data and padding).
    fn skip_rest(&mut self) -> io::Result<()> {
        let want = self.remaining + self.padding;
        if want == 0 {
            return Ok(());
        }
        let got = io::copy(&mut (&mut self.inner).take(want), &mut io::sink())?;
        self.remaining = 0;
        self.padding = 0;
        if got != want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive is truncated inside entry data",
            ));
        }
        Ok(())
    }

    /// Reads a whole (small) extension header body.
    fn read_meta(&mut self, size: u64, what: &str) -> io::Result<Vec<u8>> {
        if size > MAX_META_SIZE {
            return Err(invalid(format!(
                "{what} of {size} bytes exceeds the limit of {MAX_META_SIZE} bytes"
            )));
        }
        let mut data = vec![0u8; size as usize];
        let got = read_full(&mut self.inner, &mut data)?;
        if got != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("archive is truncated inside a {what}"),
            ));
        }
        self.remaining = 0;
        self.padding = padding_for(size);
        self.skip_rest()?;
        Ok(data)
    }

    /// The next real entry, or `None` at the end of the archive (a zero
    /// block or a clean EOF on a header boundary).
    pub(crate) fn next_entry(&mut self) -> io::Result<Option<TarEntry>> {
        self.skip_rest()?;
        if self.done {
            return Ok(None);
        }
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<(Vec<u8>, Vec<u8>)>> = None;
        let mut meta_size = 0u64;
        let mut meta_headers = 0usize;
        loop {
            let mut block = [0u8; BLOCK];
            let got = read_full(&mut self.inner, &mut block)?;
            let pending = long_name.is_some() || long_link.is_some() || pax.is_some();
            if got == 0 || (got == BLOCK && block.iter().all(|&b| b == 0)) {
                self.done = true;
                if pending {
                    return Err(invalid("archive ends after an extended header"));
                }
                return Ok(None);
            }
            if got < BLOCK {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "archive is truncated inside a header",
                ));
            }
            let header = Header::from_byte_slice(&block);
            if !checksum_ok(&block)? {
                return Err(invalid("archive header checksum mismatch"));
            }
            let kind = header.entry_type();
            let is_meta = matches!(
                kind,
                EntryType::GNULongName
                    | EntryType::GNULongLink
                    | EntryType::XHeader
                    | EntryType::XGlobalHeader
            );
            let old = header.as_old();
            let header_size = numeric(&old.size, "size")?;
            if is_meta {
                meta_headers += 1;
                if meta_headers > MAX_META_HEADERS {
                    return Err(invalid("too many extended headers before an entry"));
                }
                meta_size += BLOCK as u64 + header_size;
                match kind {
                    EntryType::GNULongName => {
                        if long_name.is_some() {
                            return Err(invalid("two gnu long names for one entry"));
                        }
                        let v = self.read_meta(header_size, "gnu long name")?;
                        long_name = Some(strip_trailing_nuls(v));
                    }
                    EntryType::GNULongLink => {
                        if long_link.is_some() {
                            return Err(invalid("two gnu long links for one entry"));
                        }
                        let v = self.read_meta(header_size, "gnu long link")?;
                        long_link = Some(strip_trailing_nuls(v));
                    }
                    EntryType::XHeader => {
                        if pax.is_some() {
                            return Err(invalid("two pax extended headers for one entry"));
                        }
                        let v = self.read_meta(header_size, "pax extended header")?;
                        pax = Some(parse_pax(&v)?);
                    }
                    _ => {
                        // Global PAX headers carry nothing we apply.
                        self.read_meta(header_size, "pax global header")?;
                    }
                }
                continue;
            }

            let records = pax.unwrap_or_default();
            let size = pax_u64(&records, "size")?.unwrap_or(header_size);
            let path = match pax_value(&records, b"path").filter(|p| !p.is_empty()) {
                Some(p) => p.to_vec(),
                None => match long_name {
                    Some(p) => p,
                    None => header.path_bytes().into_owned(),
                },
            };
            let link = match pax_value(&records, b"linkpath").filter(|p| !p.is_empty()) {
                Some(p) => Some(p.to_vec()),
                None => match long_link {
                    Some(p) => Some(p),
                    None => header.link_name_bytes().map(|c| c.into_owned()),
                },
            }
            .filter(|l| !l.is_empty());
            let uid = match pax_u64(&records, "uid")? {
                Some(v) => v,
                None => numeric(&old.uid, "uid")?,
            };
            let gid = match pax_u64(&records, "gid")? {
                Some(v) => v,
                None => numeric(&old.gid, "gid")?,
            };
            let mtime = match pax_value(&records, b"mtime") {
                Some(v) => parse_pax_time(v).ok_or_else(|| invalid("invalid pax mtime value"))?,
                None => (
                    i64::try_from(numeric(&old.mtime, "mtime")?).unwrap_or(i64::MAX),
                    0,
                ),
            };
            let xattrs = records
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(b"SCHILY.xattr.")
                        .map(|name| (name.to_vec(), v.clone()))
                })
                .collect();

            self.remaining = size;
            self.padding = padding_for(size);
            return Ok(Some(TarEntry {
                block,
                path,
                link,
                size,
                meta_size,
                uid,
                gid,
                mtime,
                xattrs,
            }));
        }
    }

    /// Reads data of the current entry; `Ok(0)` once it is exhausted.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive is truncated inside entry data",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records() {
        let data = b"30 mtime=1700000000.123456789\n16 path=a\nb/c\x00d\n";
        // Second record's length covers a value with an embedded newline.
        let recs = parse_pax(data).unwrap();
        assert_eq!(recs[0].0, b"mtime");
        assert_eq!(recs[1].1, b"a\nb/c\x00d");
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"abc path=x\n").is_err());
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(numeric(b"0000644\0", "mode").unwrap(), 0o644);
        assert_eq!(numeric(b"  755 \0\0", "mode").unwrap(), 0o755);
        assert_eq!(numeric(b"\0\0\0\0", "uid").unwrap(), 0);
        assert_eq!(numeric(b"", "uid").unwrap(), 0);
        assert_eq!(numeric(&[0x80, 0, 0, 1, 0], "size").unwrap(), 256);
        assert!(numeric(b"12x", "uid").is_err());
        assert!(numeric(&[0xff, 0xff], "mtime").is_err());
        assert!(numeric(
            &[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            "size"
        )
        .is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
