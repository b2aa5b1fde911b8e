//! Kubernetes-style resource quantities.

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
    fn cpu_units() {
        assert_eq!(parse_cpu_millis("500m").unwrap(), 500);
        assert_eq!(parse_cpu_millis("2").unwrap(), 2000);
        assert_eq!(parse_cpu_millis("0.25").unwrap(), 250);
        assert!(parse_cpu_millis("fast").is_err());
        assert!(parse_cpu_millis("1e3").is_err());
        assert!(parse_cpu_millis("-1").is_err());
    }
}
