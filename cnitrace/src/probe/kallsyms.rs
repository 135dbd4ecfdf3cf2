//! Kernel text symbols, to name a drop location's function (`/proc/kallsyms`; text symbols suffice).
//! A trace names a handful of locations: one streaming pass resolves them all without keeping the
//! 100k-line table in memory.

use std::collections::BTreeMap;

pub struct Kallsyms {
    by_addr: BTreeMap<u64, String>,
}

impl Kallsyms {
    /// Reads the text symbols. Empty (every lookup None) when addresses are hidden (kptr_restrict).
    pub fn load() -> Kallsyms {
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Kallsyms {
        let mut by_addr = BTreeMap::new();
        for line in text.lines() {
            let mut p = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (p.next(), p.next(), p.next()) else { continue };
            if !matches!(kind, "t" | "T") {
                continue;
            }
            if let Ok(a) = u64::from_str_radix(addr, 16) {
                if a != 0 {
                    by_addr.insert(a, name.to_string());
                }
            }
        }
        Kallsyms { by_addr }
    }

    /// The function containing `addr`, and the offset into it.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        self.by_addr.range(..=addr).next_back().map(|(a, n)| (n.as_str(), addr - a))
    }
}

/// Names the functions containing each of `addrs`, reading /proc/kallsyms once, line by line.
pub fn resolve(addrs: &[u64]) -> std::collections::HashMap<u64, String> {
    use std::io::BufRead;
    let mut best: std::collections::HashMap<u64, (u64, String)> = Default::default();
    let Ok(f) = std::fs::File::open("/proc/kallsyms") else { return Default::default() };
    for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
        let mut p = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (p.next(), p.next(), p.next()) else { continue };
        if !matches!(kind, "t" | "T") {
            continue;
        }
        let Ok(a) = u64::from_str_radix(addr, 16) else { continue };
        if a == 0 {
            continue;
        }
        for &want in addrs {
            if a <= want && best.get(&want).is_none_or(|(b, _)| a > *b) {
                best.insert(want, (a, name.to_string()));
            }
        }
    }
    best.into_iter().map(|(k, (_, n))| (k, n)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_enclosing_function() {
        let k = super::Kallsyms::parse("ffffffff81000000 T _stext\nffffffff81a00000 t br_handle_frame\nffffffff81a00400 T br_forward\nffffffff81b00000 d some_data\n");
        assert_eq!(k.lookup(0xffffffff81a00123), Some(("br_handle_frame", 0x123)));
        assert_eq!(k.lookup(0xffffffff81a00400), Some(("br_forward", 0)));
    }
}
