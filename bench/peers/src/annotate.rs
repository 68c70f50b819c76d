//! `peers annotate CALLGRIND_OUT --ops N`: instructions per operation by source line, for the
//! source files under `--prefix` (default: crates/tidepool/src of this checkout).
//!
//! For each line: `self` is the cost of the instructions compiled from that line (inlined code
//! counts where it was written, not where it was inlined), `incl` adds the inclusive cost of the
//! calls made from that line. Read the callgrind format as callgrind_annotate does (name
//! compression, relative positions, `fi=`/`fe=` for inlined files).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// A callgrind.out file (from the `profile` script).
    file: PathBuf,
    /// Operations the profile ran (costs are divided by it).
    #[arg(long, default_value_t = 1)]
    ops: u64,
    /// Only source files whose path contains this (default: crates/tidepool/src).
    #[arg(long, default_value = "crates/tidepool/src")]
    prefix: String,
    /// Lines (and functions) to show.
    #[arg(long, default_value_t = 40)]
    top: usize,
    /// Functions listed in the per-function table: names containing any of these.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tidepool::,tokio_postgres::,postgres_protocol::,tokio::sync,tokio::time,futures_channel::,deadpool,bb8::,sqlx_core::,memcpy,malloc,free"
    )]
    functions: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct LineCost {
    self_ir: u64,
    call_ir: u64,
    calls: u64,
}

fn name(map: &mut HashMap<String, String>, spec: &str) -> String {
    // "(id) name" defines, "(id)" refers, anything else is a plain name.
    let spec = spec.trim();
    if let Some(rest) = spec.strip_prefix('(') {
        if let Some(end) = rest.find(')') {
            let id = &rest[..end];
            let tail = rest[end + 1..].trim();
            if tail.is_empty() {
                return map.get(id).cloned().unwrap_or_default();
            }
            map.insert(id.to_owned(), tail.to_owned());
            return tail.to_owned();
        }
    }
    spec.to_owned()
}

pub fn main(args: Args) -> ExitCode {
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {}: {e}", args.file.display());
            return ExitCode::from(2);
        }
    };
    let mut files: HashMap<String, String> = HashMap::new();
    let mut fns: HashMap<String, String> = HashMap::new();
    let mut objs: HashMap<String, String> = HashMap::new();
    let mut file = String::new();
    let mut func = String::new();
    let mut pending_calls: u64 = 0;
    let mut pending_callee = String::new();
    let mut line: i64 = 0;
    let mut costs: HashMap<(String, i64), LineCost> = HashMap::new();
    // (file, line) -> callee -> inclusive cost, to say what a hot line calls.
    let mut callees: HashMap<(String, i64), HashMap<String, u64>> = HashMap::new();
    let mut line_fn: HashMap<(String, i64), String> = HashMap::new();
    let mut total: u64 = 0;
    // function -> (self, calls to other functions), merged over the files it spans.
    let mut fn_costs: HashMap<String, (u64, u64)> = HashMap::new();

    for raw in text.lines() {
        let l = raw.trim_end();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let first = l.as_bytes()[0];
        if first.is_ascii_digit() || first == b'+' || first == b'-' || first == b'*' {
            let mut parts = l.split_whitespace();
            let pos = parts.next().unwrap_or("0");
            let prev = line;
            line = if let Some(n) = pos.strip_prefix('+') {
                prev + n.parse::<i64>().unwrap_or(0)
            } else if let Some(n) = pos.strip_prefix('-') {
                prev - n.parse::<i64>().unwrap_or(0)
            } else if pos == "*" {
                prev
            } else {
                pos.parse().unwrap_or(0)
            };
            let ir: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let key = (file.clone(), line);
            let c = costs.entry(key.clone()).or_default();
            let fc = fn_costs.entry(func.clone()).or_default();
            if pending_calls > 0 {
                if pending_callee != func {
                    fc.1 += ir;
                }
                c.call_ir += ir;
                c.calls += pending_calls;
                *callees
                    .entry(key.clone())
                    .or_default()
                    .entry(pending_callee.clone())
                    .or_default() += ir;
                pending_calls = 0;
            } else {
                fc.0 += ir;
                c.self_ir += ir;
            }
            line_fn.entry(key).or_insert_with(|| func.clone());
            continue;
        }
        let (k, v) = match l.split_once('=') {
            Some(kv) => kv,
            None => {
                if let Some(v) = l
                    .strip_prefix("summary:")
                    .or_else(|| l.strip_prefix("totals:"))
                {
                    total = total.max(
                        v.split_whitespace()
                            .next()
                            .and_then(|x| x.parse().ok())
                            .unwrap_or(0),
                    );
                }
                continue;
            }
        };
        match k {
            "fl" | "fi" | "fe" => file = name(&mut files, v),
            "fn" => func = name(&mut fns, v),
            "cfi" | "cfl" | "jfi" => {
                name(&mut files, v);
            }
            "cfn" => pending_callee = name(&mut fns, v),
            "jfn" => {
                name(&mut fns, v);
            }
            "ob" | "cob" => {
                name(&mut objs, v);
            }
            "calls" => {
                pending_calls = v
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
            }
            _ => {}
        }
    }

    let ops = args.ops.max(1) as f64;
    let mut fv: Vec<(&String, &(u64, u64))> = fn_costs
        .iter()
        .filter(|(f, _)| args.functions.iter().any(|p| f.contains(p.as_str())))
        .collect();
    fv.sort_by_key(|b| std::cmp::Reverse(b.1 .0 + b.1 .1));
    println!("functions (Ir per operation; incl = self + callees):");
    println!("{:>9} {:>9}  function", "incl/op", "self/op");
    for (f, (se, ca)) in fv.into_iter().take(args.top) {
        let f: String = f.chars().take(150).collect();
        println!(
            "{:>9.1} {:>9.1}  {}",
            (se + ca) as f64 / ops,
            *se as f64 / ops,
            f
        );
    }
    println!();
    let mut rows: Vec<(&(String, i64), &LineCost)> = costs
        .iter()
        .filter(|((f, _), _)| f.contains(&args.prefix))
        .collect();
    rows.sort_by_key(|b| std::cmp::Reverse(b.1.self_ir + b.1.call_ir));
    let file_self: u64 = rows.iter().map(|(_, c)| c.self_ir).sum();
    println!(
        "total {:.0} Ir/op; self cost of lines in files matching {:?}: {:.0} Ir/op ({:.1}%)",
        total as f64 / ops,
        args.prefix,
        file_self as f64 / ops,
        100.0 * file_self as f64 / total.max(1) as f64
    );
    println!(
        "{:>9} {:>9}  {:<40} source / hottest callee",
        "incl/op", "self/op", "file:line"
    );
    let mut sources: HashMap<String, Vec<String>> = HashMap::new();
    for ((f, ln), c) in rows.into_iter().take(args.top) {
        let src = sources.entry(f.clone()).or_insert_with(|| {
            std::fs::read_to_string(f)
                .map(|s| s.lines().map(str::to_owned).collect())
                .unwrap_or_default()
        });
        let code = src
            .get((*ln as usize).wrapping_sub(1))
            .map_or("", |s| s.trim());
        let short = f.rsplit_once("/src/").map_or(f.as_str(), |(_, s)| s);
        println!(
            "{:>9.1} {:>9.1}  {:<40} {}",
            (c.self_ir + c.call_ir) as f64 / ops,
            c.self_ir as f64 / ops,
            format!("{short}:{ln}"),
            code
        );
        if let Some(m) = callees.get(&(f.clone(), *ln)) {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1));
            for (callee, ir) in v.into_iter().take(2) {
                if (*ir as f64 / ops) >= 1.0 {
                    let callee: String = callee.chars().take(110).collect();
                    println!(
                        "{:>9.1} {:>9}  {:<40}   -> {}",
                        *ir as f64 / ops,
                        "",
                        "",
                        callee
                    );
                }
            }
        }
    }
    ExitCode::SUCCESS
}
