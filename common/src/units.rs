//! Quantities as messages print them: bytes and counts to three significant
//! figures in decimal units, so a message fits the size it talks about
//! ("12.0 MB free", "41.2 TB asked for").

/// `n` bytes in decimal units, three significant figures ("41.2 TB").
pub fn human_bytes(n: u64) -> String {
    human(n as f64, &["B", "kB", "MB", "GB", "TB", "PB"], " ")
}

/// A count in decimal units, three significant figures ("10.3 G").
pub fn human_count(n: u64) -> String {
    human(n as f64, &["", "k", "M", "G", "T", "P"], " ")
}

fn human(mut v: f64, units: &[&str], sep: &str) -> String {
    let mut u = 0;
    while v >= 999.5 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    let digits = if u == 0 || v >= 99.95 {
        0
    } else if v >= 9.995 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{sep}{}", units[u]).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_significant_figures() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(999_700), "1.00 MB");
        assert_eq!(human_bytes(1_500_000_000), "1.50 GB");
        assert_eq!(human_bytes(123_456_789), "123 MB");
        assert_eq!(human_bytes(12_000_000), "12.0 MB");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_count(10_309_174_300_000), "10.3 T");
        assert_eq!(human_count(42), "42");
    }
}
