//! `moat check`'s static look at a policy: the globals its code reads that nothing defines
//! (a handler using `auth` without `require`, a misspelt `Reponse`), found before any request
//! reaches the handler and fails there.
//!
//! Lua's own compiler resolves every name: a global is what it compiles to a `GETTABUP` on
//! the `_ENV` upvalue. So the chunk is compiled (never run for this) and its bytecode read
//! ([`global_uses`]); a name is defined when a fresh policy state has it (moat's API and
//! Lua's safe library), when the script's top level left it set, or when any chunk assigns
//! it (`SETTABUP`). No scope analysis of our own, so no false alarm from one.

use std::collections::BTreeSet;

/// One global a chunk reads or assigns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalUse {
    pub name: String,
    pub line: u32,
    pub assigns: bool,
}

/// A global read that nothing defines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undefined {
    pub file: std::path::PathBuf,
    pub line: u32,
    pub name: String,
}

impl std::fmt::Display for Undefined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {} is not defined: ", self.file.display(), self.line, self.name)?;
        match stdlib_module(&self.name) {
            Some(module) => write!(f, "add `local {} = require(\"{module}\")` at the top", self.name),
            None => write!(f, "not moat's API, Lua's library or set by the script (a typo, or a missing `local`?)"),
        }
    }
}

/// The bundled module a name suggests (`auth` → `moat.auth`).
fn stdlib_module(name: &str) -> Option<String> {
    super::sandbox::stdlib_names().find(|m| m.strip_prefix("moat.") == Some(name)).map(str::to_string)
}

/// The globals read in `chunks` (file, source) that are not in `defined` and that no chunk
/// assigns; one per name and line.
pub fn undefined_globals(
    lua: &mlua::Lua,
    chunks: &[(std::path::PathBuf, &str)],
    defined: &BTreeSet<String>,
) -> Result<Vec<Undefined>, String> {
    let mut uses = Vec::new();
    for (file, source) in chunks {
        let function = lua
            .load(*source)
            .set_name(format!("@{}", file.display()))
            .set_mode(mlua::chunk::ChunkMode::Text)
            .into_function()
            .map_err(|e| e.to_string())?;
        let found = global_uses(&function.dump(false)).map_err(|e| format!("{}: {e}", file.display()))?;
        uses.extend(found.into_iter().map(|u| (file.clone(), u)));
    }
    let assigned: BTreeSet<&str> = uses.iter().filter(|(_, u)| u.assigns).map(|(_, u)| u.name.as_str()).collect();
    let mut out: Vec<Undefined> = uses
        .iter()
        .filter(|(_, u)| !u.assigns && !defined.contains(&u.name) && !assigned.contains(u.name.as_str()))
        .map(|(file, u)| Undefined { file: file.clone(), line: u.line, name: u.name.clone() })
        .collect();
    out.sort_by(|a, b| (&a.file, a.line, &a.name).cmp(&(&b.file, b.line, &b.name)));
    out.dedup();
    Ok(out)
}

/// The undefined globals of a loaded generation's policy and the modules it requires from its
/// folder: what a fresh state defines (moat's API, Lua's library) and what the policy's top
/// level leaves set, run again in a state of its own, count as defined.
pub fn undefined_in_generation(
    g: &super::load::Generation,
    limits: &crate::config::Limits,
) -> Result<Vec<Undefined>, String> {
    let modules = super::sandbox::ModuleSource {
        dir: g.path.parent().map(std::path::Path::to_path_buf).unwrap_or_default(),
        captured: g.modules.clone(),
        read: Default::default(),
    };
    let lua = super::sandbox::new_state(super::sandbox::StateOptions {
        memory_limit: limits.lua_memory,
        body_buffer: limits.body_buffer,
        upstream: None,
        sink: None,
        modules,
        policy_path: &g.path,
    })
    .map_err(|e| e.to_string())?;
    super::load::run_chunk(&lua, &g.path, &g.source, &g.class, limits).map_err(|e| e.to_string())?;
    let mut defined = BTreeSet::new();
    for pair in lua.globals().pairs::<mlua::Value, mlua::Value>() {
        if let (mlua::Value::String(name), _) = pair.map_err(|e| e.to_string())? {
            defined.insert(name.to_string_lossy());
        }
    }
    let mut chunks = vec![(g.path.clone(), &*g.source)];
    chunks.extend(g.modules.values().map(|(path, source)| (path.clone(), &**source)));
    undefined_globals(&lua, &chunks, &defined)
}

/// The globals a dumped Lua 5.4 chunk (`string.dump` with debug information) reads and
/// assigns, with their lines.
pub fn global_uses(dump: &[u8]) -> Result<Vec<GlobalUse>, String> {
    let mut r = Reader { bytes: dump, at: 0 };
    r.header()?;
    let _main_upvalues = r.byte()?;
    let mut out = Vec::new();
    r.function(&mut out)?;
    Ok(out)
}

/// Lua 5.4's opcodes that index `_ENV` with a constant string (lopcodes.h). A name whose
/// constant index passes 255 (a function with that many constants) is reached another way
/// and is not seen: a read missed, never one reported falsely.
const OP_GETTABUP: u32 = 11;
const OP_SETTABUP: u32 = 15;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// A constant of a function: only strings matter here.
enum Constant {
    Str(String),
    Other,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated chunk")?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    /// ldump.c's `dumpSize`: 7 bits a byte, most significant first, the last byte marked.
    fn size(&mut self) -> Result<usize, String> {
        let mut x: usize = 0;
        loop {
            let b = self.byte()?;
            x = x.checked_mul(128).ok_or("bad size in chunk")? | usize::from(b & 0x7f);
            if b & 0x80 != 0 {
                return Ok(x);
            }
        }
    }

    fn string(&mut self) -> Result<Option<String>, String> {
        match self.size()? {
            0 => Ok(None),
            n => Ok(Some(String::from_utf8_lossy(self.take(n - 1)?).into_owned())),
        }
    }

    fn header(&mut self) -> Result<(), String> {
        let ok = self.take(4)? == b"\x1bLua" && self.byte()? == 0x54 && self.byte()? == 0;
        let data = self.take(6)? == b"\x19\x93\r\n\x1a\n";
        let sizes = self.take(3)? == [4, 8, 8];
        if !(ok && data && sizes) {
            return Err("not a Lua 5.4 chunk of this build".into());
        }
        self.take(16).map(drop)
    }

    fn function(&mut self, out: &mut Vec<GlobalUse>) -> Result<(), String> {
        let _source = self.string()?;
        let line_defined = self.size()?;
        let _last_line = self.size()?;
        self.take(3)?; // numparams, is_vararg, maxstacksize
        let code: Vec<u32> = (0..self.size()?)
            .map(|_| self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect::<Result<_, _>>()?;
        let mut constants = Vec::new();
        for _ in 0..self.size()? {
            constants.push(match self.byte()? {
                0 | 1 | 17 => Constant::Other,
                3 | 19 => {
                    self.take(8)?;
                    Constant::Other
                }
                4 | 20 => Constant::Str(self.string()?.unwrap_or_default()),
                tag => return Err(format!("unknown constant type {tag}")),
            });
        }
        let upvalues = self.size()?;
        self.take(upvalues * 3)?;
        for _ in 0..self.size()? {
            self.function(out)?;
        }
        // Debug information: line deltas, absolute lines, locals, upvalue names.
        let n = self.size()?;
        let deltas: Vec<i8> = self.take(n)?.iter().map(|&b| b as i8).collect();
        let mut absolute = Vec::new();
        for _ in 0..self.size()? {
            absolute.push((self.size()?, self.size()?));
        }
        for _ in 0..self.size()? {
            self.string()?;
            self.size()?;
            self.size()?;
        }
        let names: Vec<Option<String>> = (0..self.size()?).map(|_| self.string()).collect::<Result<_, _>>()?;
        let is_env = |upvalue: u32| names.get(upvalue as usize).is_some_and(|n| n.as_deref() == Some("_ENV"));
        let line_of = |pc: usize| {
            // ldebug.c's luaG_getfuncline: the last absolute line at or before pc, plus deltas.
            let (mut base_pc, mut line) = match absolute.iter().rev().find(|(p, _)| *p <= pc) {
                Some(&(p, l)) => (p as isize, l as i64),
                None => (-1, line_defined as i64),
            };
            while base_pc < pc as isize {
                base_pc += 1;
                line += i64::from(deltas.get(base_pc as usize).copied().unwrap_or(0));
            }
            line.max(0) as u32
        };
        for (pc, &i) in code.iter().enumerate() {
            let (op, a, b, c) = (i & 0x7f, (i >> 7) & 0xff, (i >> 16) & 0xff, (i >> 24) & 0xff);
            let (upvalue, key, assigns) = match op {
                OP_GETTABUP => (b, c, false),
                OP_SETTABUP => (a, b, true),
                _ => continue,
            };
            if let (true, Some(Constant::Str(name))) = (is_env(upvalue), constants.get(key as usize)) {
                out.push(GlobalUse { name: name.clone(), line: line_of(pc), assigns });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses(source: &str) -> Vec<(String, u32, bool)> {
        let lua = mlua::Lua::new();
        let f = lua.load(source).set_name("@t.lua").into_function().unwrap();
        let mut all: Vec<_> =
            global_uses(&f.dump(false)).unwrap().into_iter().map(|u| (u.name, u.line, u.assigns)).collect();
        all.sort_by_key(|(name, line, _)| (*line, name.clone()));
        all
    }

    #[test]
    fn reads_and_assignments_of_globals_with_their_lines_and_no_locals() {
        let source =
            "local a = 1\nx = y\nlocal function f(p)\n  local q = p + a\n  return z(q), string.rep('', 1)\nend\n";
        assert_eq!(
            uses(source),
            vec![("x".into(), 2, true), ("y".into(), 2, false), ("string".into(), 5, false), ("z".into(), 5, false)]
        );
    }

    #[test]
    fn lines_stay_right_far_into_a_long_function() {
        // Lua stores an absolute line every 128 instructions or after a big jump.
        let mut source = String::from("function f()\n  local t = {}\n");
        for i in 0..300 {
            source.push_str(&format!("  t[{}] = {}\n", i % 7, i % 5));
        }
        source.push_str("\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n");
        source.push_str("  return missing\nend\n");
        assert_eq!(uses(&source), vec![("f".into(), 1, true), ("missing".into(), 343, false)]);
    }
}
