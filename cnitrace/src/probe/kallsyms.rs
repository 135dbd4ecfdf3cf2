//! Kernel text symbols, to name a drop location's function (`/proc/kallsyms`; text symbols suffice).
//! A trace names a handful of locations: one streaming pass resolves them all without keeping the
//! 100k-line table in memory.

use std::{collections::HashMap, io::BufRead};

/// Names the functions containing each of `addrs`, reading /proc/kallsyms once, line by line.
pub fn resolve(addrs: &[u64]) -> HashMap<u64, String> {
    let Ok(f) = std::fs::File::open("/proc/kallsyms") else { return HashMap::new() };
    resolve_in(std::io::BufReader::new(f).lines().map_while(Result::ok), addrs)
}

/// The same over any kallsyms text: for each address, the closest text symbol at or below it.
fn resolve_in(lines: impl Iterator<Item = String>, addrs: &[u64]) -> HashMap<u64, String> {
    let mut best: HashMap<u64, (u64, String)> = HashMap::new();
    for line in lines {
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
        let text = "ffffffff81000000 T _stext\nffffffff81a00000 t br_handle_frame\nffffffff81a00400 T br_forward\nffffffff81b00000 d some_data\n";
        let names = super::resolve_in(text.lines().map(str::to_string), &[0xffffffff81a00123, 0xffffffff81a00400, 0xffffffff81b00010]);
        assert_eq!(names[&0xffffffff81a00123], "br_handle_frame");
        assert_eq!(names[&0xffffffff81a00400], "br_forward");
        assert_eq!(names[&0xffffffff81b00010], "br_forward", "data symbols are not functions");
    }
}
