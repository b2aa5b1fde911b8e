//! Kubernetes-style resource quantities. A spec's quantities are parsed once, when the spec is
//! read, into a [`Quantity`]: the text as written (what is written back, so hashes of a spec
//! never change with how a value is spelled) and its value. Reading never fails on a bad
//! quantity, so one bad object cannot break a list or a watch: the error is kept, and
//! validation reports it with the field's path.

use std::borrow::Cow;
use std::marker::PhantomData;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a quantity measures: how it is parsed, and the pattern the CRD schema gives it.
pub trait Unit {
    const NAME: &'static str;
    const PATTERN: &'static str;
    fn parse(text: &str) -> Result<u64, String>;
}

/// Bytes of memory (`64Mi`, `1G`, `1048576`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes;

impl Unit for Bytes {
    const NAME: &'static str = "MemoryQuantity";
    const PATTERN: &'static str = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(k|K|M|G|T|Ki|Mi|Gi|Ti)?$";
    fn parse(text: &str) -> Result<u64, String> {
        parse_memory_bytes(text)
    }
}

/// Thousandths of a CPU (`500m`, `1`, `0.25`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millicores;

impl Unit for Millicores {
    const NAME: &'static str = "CpuQuantity";
    const PATTERN: &'static str = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)m?$";
    fn parse(text: &str) -> Result<u64, String> {
        parse_cpu_millis(text)
    }
}

/// A quantity as written and its value in `U`, or why it has none.
#[derive(Debug, Clone)]
pub struct Quantity<U> {
    text: String,
    value: Result<u64, String>,
    unit: PhantomData<U>,
}

pub type Memory = Quantity<Bytes>;
pub type Cpu = Quantity<Millicores>;

impl<U: Unit> Quantity<U> {
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let value = U::parse(&text);
        Quantity {
            text,
            value,
            unit: PhantomData,
        }
    }

    /// Its value, or why it is not a quantity (validation refuses such a spec).
    pub fn value(&self) -> Result<u64, &str> {
        self.value.as_ref().copied().map_err(String::as_str)
    }

    /// Its value, 0 when it has none.
    pub fn or_zero(&self) -> u64 {
        self.value().unwrap_or(0)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<U: Unit> From<&str> for Quantity<U> {
    fn from(text: &str) -> Self {
        Quantity::new(text)
    }
}

impl<U> PartialEq for Quantity<U> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<U> std::fmt::Display for Quantity<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl<U> Serialize for Quantity<U> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Only a string, as the CRD schema has it (`memory: "1048576"`, not a bare number): what the
/// API server refuses, the offline validator refuses too.
impl<'de, U: Unit> Deserialize<'de> for Quantity<U> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        Ok(Quantity::new(text.into_owned()))
    }
}

impl<U: Unit> JsonSchema for Quantity<U> {
    fn schema_name() -> Cow<'static, str> {
        U::NAME.into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": U::PATTERN})
    }

    fn inline_schema() -> bool {
        true
    }
}

/// `64Mi`, `1G`, `1.5Gi`, `1048576`, `512k` -> bytes.
pub fn parse_memory_bytes(q: &str) -> Result<u64, String> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{q:?} has an unknown unit {suffix:?} (use Ki, Mi, Gi, k, M, G)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{q:?} is not a quantity like 64Mi"))?;
    let bytes = n * mult;
    if !bytes.is_finite() || !(0.0..=1e18).contains(&bytes) {
        return Err(format!("{q:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// `500m`, `1`, `0.25` -> millicores.
pub fn parse_cpu_millis(q: &str) -> Result<u64, String> {
    let q = q.trim();
    let (num, scale) = match q.strip_suffix('m') {
        Some(n) => (n, 1.0),
        None => (q, 1000.0),
    };
    // Digits and one dot only (what the CRD's pattern allows): no exponent, sign or `inf`.
    let plain = num.chars().all(|c| c.is_ascii_digit() || c == '.');
    let n: f64 = num
        .parse()
        .ok()
        .filter(|_| plain)
        .ok_or_else(|| format!("{q:?} is not a cpu quantity like 500m or 1.5"))?;
    if !n.is_finite() || !(0.0..=1e6).contains(&n) {
        return Err(format!("{q:?} is out of range"));
    }
    Ok((n * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory_bytes("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_memory_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory_bytes("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_memory_bytes("4096").unwrap(), 4096);
        assert!(parse_memory_bytes("12XB").is_err());
        assert!(parse_memory_bytes("Mi").is_err());
    }

    #[test]
    fn a_quantity_is_parsed_once_and_written_back_as_it_was_written() {
        let m: Memory = serde_json::from_str("\"1.5Gi\"").unwrap();
        assert_eq!(m.value(), Ok(3 << 29));
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"1.5Gi\"");
        let n: Memory = serde_json::from_str("\"1048576\"").unwrap();
        assert_eq!((n.value(), n.as_str()), (Ok(1 << 20), "1048576"));
        let c: Cpu = serde_json::from_str("\"0.5\"").unwrap();
        assert_eq!(c.value(), Ok(500));
        // Not a string: refused, as the CRD schema refuses it.
        assert!(serde_json::from_str::<Cpu>("1000").is_err());
        // A bad one reads, and says why when asked.
        let bad: Memory = serde_json::from_str("\"12XB\"").unwrap();
        assert!(bad.value().unwrap_err().contains("unknown unit"), "{bad:?}");
        assert_eq!(bad.or_zero(), 0);
        assert_eq!(serde_json::to_string(&bad).unwrap(), "\"12XB\"");
    }

    #[test]
    fn cpu_units() {
        assert_eq!(parse_cpu_millis("500m").unwrap(), 500);
        assert_eq!(parse_cpu_millis("2").unwrap(), 2000);
        assert_eq!(parse_cpu_millis("0.25").unwrap(), 250);
        assert!(parse_cpu_millis("fast").is_err());
        assert!(parse_cpu_millis("1e3").is_err());
        assert!(parse_cpu_millis("-1").is_err());
    }
}
