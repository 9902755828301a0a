// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Human formatting: byte counts with binary units, rates, ratios and
//! aligned tables.

/// Formats a byte count with a binary unit: `812 B`, `4.0 KiB`, `512.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // 1023.96 would print as "1024.0 KiB"; say "1.0 MiB" instead.
    if value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Formats a quota: `unlimited` for `u64::MAX`, else [`bytes`].
pub fn quota(n: u64) -> String {
    if n == u64::MAX {
        "unlimited".to_string()
    } else {
        bytes(n)
    }
}

/// Formats a byte rate: `1.5 MiB/s`.
pub fn byte_rate(per_sec: f64) -> String {
    let n = if per_sec.is_finite() && per_sec > 0.0 {
        per_sec.round() as u64
    } else {
        0
    };
    format!("{}/s", bytes(n))
}

/// Formats an event rate with one decimal: `1234.5`.
pub fn rate(per_sec: f64) -> String {
    format!("{:.1}", per_sec.max(0.0))
}

/// Formats a ratio with two decimals: `2.41`.
pub fn ratio(r: f64) -> String {
    format!("{r:.2}")
}

/// Formats a fraction as a percentage with two decimals (`93.75%`), or `-`
/// when there is nothing to divide.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_string()
    } else {
        format!("{:.2}%", part as f64 * 100.0 / whole as f64)
    }
}

/// Formats an optional fraction (0..=1) as [`percent`] does.
pub fn fraction(f: Option<f64>) -> String {
    match f {
        Some(f) => format!("{:.2}%", f * 100.0),
        None => "-".to_string(),
    }
}

/// `yes` or `no`.
pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// How a column is aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text: padded on the right.
    Left,
    /// Numbers: padded on the left.
    Right,
}

/// A table with a header row and columns aligned on their widest cell.
#[derive(Clone, Debug, Default)]
pub struct Table {
    headers: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Table {
            headers: columns.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table, one line per row (header first), columns separated by two
    /// spaces, no trailing blanks; every line ends with a newline.
    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| h.clone()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - width(cell);
                match self.headers[i].1 {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Lines of `key: value` with the values aligned.
#[derive(Clone, Debug, Default)]
pub struct Fields {
    items: Vec<(String, String)>,
}

impl Fields {
    /// No fields yet.
    pub fn new() -> Self {
        Fields::default()
    }

    /// Adds a field.
    pub fn add(&mut self, key: &str, value: impl Into<String>) {
        self.items.push((key.to_string(), value.into()));
    }

    /// The fields, indented by `indent` spaces; a value with several lines
    /// has its later lines aligned under the first.
    pub fn render(&self, indent: usize) -> String {
        let kw = self
            .items
            .iter()
            .map(|(k, _)| k.chars().count() + 1)
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (k, v) in &self.items {
            let mut lines = v.lines();
            let first = lines.next().unwrap_or("");
            let key = format!("{k}:");
            let line = format!("{:indent$}{key:<kw$}  {first}", "");
            out.push_str(line.trim_end());
            out.push('\n');
            for more in lines {
                out.push_str(&format!("{:w$}{more}\n", "", w = indent + kw + 2));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(512 << 20), "512.0 MiB");
        assert_eq!(bytes(2 << 30), "2.0 GiB");
        assert_eq!(bytes((1 << 20) - 1), "1.0 MiB");
        assert_eq!(bytes(3 << 40), "3.0 TiB");
        assert_eq!(bytes(u64::MAX - 1), "16.0 EiB");
        assert_eq!(quota(u64::MAX), "unlimited");
        assert_eq!(quota(256 << 20), "256.0 MiB");
        assert_eq!(byte_rate(1536.0), "1.5 KiB/s");
        assert_eq!(byte_rate(f64::NAN), "0 B/s");
    }

    #[test]
    fn numbers() {
        assert_eq!(ratio(2.0), "2.00");
        assert_eq!(ratio(1.0 / 3.0), "0.33");
        assert_eq!(percent(3, 4), "75.00%");
        assert_eq!(percent(0, 0), "-");
        assert_eq!(fraction(Some(0.5)), "50.00%");
        assert_eq!(fraction(None), "-");
        assert_eq!(rate(12.345), "12.3");
        assert_eq!(rate(-1.0), "0.0");
    }

    #[test]
    fn table_alignment() {
        let mut t = Table::new(&[("NAME", Align::Left), ("PAGES", Align::Right)]);
        t.row(vec!["vm1".into(), "5".into()]);
        t.row(vec!["longname".into(), "12345".into()]);
        assert_eq!(
            t.render(),
            "NAME      PAGES\nvm1           5\nlongname  12345\n"
        );
        let mut t = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        t.row(vec!["x".into()]);
        assert_eq!(t.render(), "A  B\nx\n");
    }

    #[test]
    fn fields_alignment() {
        let mut f = Fields::new();
        f.add("a", "1");
        f.add("longer", "two\nlines");
        assert_eq!(
            f.render(2),
            "  a:       1\n  longer:  two\n           lines\n"
        );
    }
}
