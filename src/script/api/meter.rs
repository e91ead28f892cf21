//! Memory that Lua objects hold outside Lua, charged to the state's `limits.lua_memory`.
//!
//! A Request made from a 256 KiB string is a few hundred bytes to Lua's collector and 256 KiB
//! to the process. The collector paces itself by Lua's own allocations only, so a handler that
//! made such objects in a loop grew moat by gigabytes (20,000 of them: 4.7 GB resident with a
//! 64 MiB `lua_memory`) before a collection freed any. Every object that holds bytes outside
//! Lua (a body in memory, a header map, a URL, an upstream answer still streaming) carries a
//! [`Charge`], and its state's [`Meter`] makes two promises:
//!
//! - **Budget.** Lua's own memory plus every live charge stays within `lua_memory`: Lua's
//!   allocator limit is lowered by what is held outside, and a charge that does not fit even
//!   after a full collection is a memory error (the call fails with 500, as Lua's own would).
//! - **Pacing.** Every [`Meter::pace`] bytes charged, the collector takes a step, as it would
//!   had Lua allocated them itself: garbage objects holding big buffers are freed as promptly
//!   as big strings are.

use std::cell::{Cell, OnceCell};
use std::rc::Rc;

use http::HeaderMap;
use mlua::{Lua, Result};

/// What an upstream answer still streaming holds at least: hyper's first read buffer for its
/// connection (which lives as long as the body is unread).
pub const STREAM_HOLD: usize = 8 * 1024;

/// One state's account of what its objects hold outside Lua.
pub struct Meter {
    budget: usize,
    /// Bytes charged and not yet released.
    held: Cell<usize>,
    /// Bytes charged since the collector last stepped.
    unpaced: Cell<usize>,
    pace: usize,
    /// To give Lua back its room when a charge is released (by a collection, usually).
    lua: mlua::WeakLua,
}

impl Meter {
    /// Installs a meter with `budget` (the state's `lua_memory`) into `lua`.
    pub fn install(lua: &Lua, budget: usize) -> Result<()> {
        let meter = Rc::new(Meter {
            budget,
            held: Cell::new(0),
            unpaced: Cell::new(0),
            pace: (budget / 64).clamp(64 << 10, 1 << 20),
            lua: lua.weak(),
        });
        lua.set_app_data(meter);
        lua.set_memory_limit(budget)?;
        Ok(())
    }

    fn of(lua: &Lua) -> Option<Rc<Meter>> {
        lua.app_data_ref::<Rc<Meter>>().map(|m| Rc::clone(&m))
    }

    /// Bytes held outside Lua by this state's live objects.
    #[cfg(test)]
    pub fn held(lua: &Lua) -> usize {
        Self::of(lua).map_or(0, |m| m.held.get())
    }

    fn charge(&self, lua: &Lua, bytes: usize) -> Result<()> {
        let fits = || lua.used_memory() + self.held.get() + bytes <= self.budget;
        if !fits() {
            // Garbage may hold what is asked for: a full collection releases its charges.
            lua.gc_collect()?;
            if !fits() {
                return Err(mlua::Error::MemoryError(format!(
                    "not enough memory: this state's objects hold {} KiB outside Lua (bodies, headers) and Lua {} KiB; {} KiB more is over limits.lua_memory ({} KiB)",
                    self.held.get() >> 10,
                    lua.used_memory() >> 10,
                    bytes >> 10,
                    self.budget >> 10
                )));
            }
        }
        self.held.set(self.held.get() + bytes);
        self.lower_lua_limit(lua);
        let unpaced = self.unpaced.get() + bytes;
        if unpaced >= self.pace {
            self.unpaced.set(0);
            lua.gc_step()?;
        } else {
            self.unpaced.set(unpaced);
        }
        Ok(())
    }

    fn release(&self, bytes: usize) {
        self.held.set(self.held.get().saturating_sub(bytes));
        // While the state is being closed there is nothing to give room back to.
        if let Some(lua) = self.lua.try_upgrade() {
            self.lower_lua_limit(&lua);
        }
    }

    /// Lua may allocate what the budget leaves after the charges (0 would mean no limit).
    fn lower_lua_limit(&self, lua: &Lua) {
        let _ = lua.set_memory_limit(self.budget.saturating_sub(self.held.get()).max(1));
    }
}

/// Bytes an object holds outside Lua; released when the object is dropped (collected).
#[derive(Default)]
pub struct Charge {
    bytes: Cell<usize>,
    meter: OnceCell<Rc<Meter>>,
}

impl Charge {
    /// A charge of `bytes` to `lua`'s meter; an error if they do not fit its budget.
    pub fn new(lua: &Lua, bytes: usize) -> Result<Self> {
        let charge = Self::default();
        charge.add(lua, bytes)?;
        Ok(charge)
    }

    /// Charges `bytes` more (a header set, a body read into memory).
    pub fn add(&self, lua: &Lua, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let meter = match self.meter.get() {
            Some(m) => m,
            None => match Meter::of(lua) {
                Some(m) => self.meter.get_or_init(|| m),
                // A state without a meter (none is made so today) charges nothing.
                None => return Ok(()),
            },
        };
        meter.charge(lua, bytes)?;
        self.bytes.set(self.bytes.get() + bytes);
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(m) = self.meter.get() {
            m.release(self.bytes.get());
        }
    }
}

/// What a header map holds: names, values and the map's own entry (about 32 bytes each).
pub fn header_bytes(map: &HeaderMap) -> usize {
    map.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Holder(#[allow(dead_code)] Charge);
    impl mlua::UserData for Holder {}

    fn state(budget: usize) -> Lua {
        let lua = Lua::new();
        Meter::install(&lua, budget).unwrap();
        let make = lua.create_function(|lua, kib: usize| Ok(Holder(Charge::new(lua, kib << 10)?))).unwrap();
        lua.globals().set("make", make).unwrap();
        lua
    }

    #[test]
    fn garbage_releases_its_charges_as_the_collector_is_paced_and_live_charges_meet_the_budget() {
        let lua = state(8 << 20);
        // 64 MiB made and dropped at once within an 8 MiB budget: the paced steps free them.
        lua.load("for i = 1, 256 do make(256) end").exec().unwrap();
        assert!(Meter::held(&lua) <= 2 << 20, "held {} KiB", Meter::held(&lua) >> 10);
        // Kept alive, they are a memory error once the budget is reached.
        let err = lua.load("keep = {} for i = 1, 64 do keep[i] = make(256) end").exec().unwrap_err();
        assert!(err.to_string().contains("over limits.lua_memory"), "{err}");
        assert!(Meter::held(&lua) <= 8 << 20);
        // Lua's own allocations see the room the charges take.
        assert!(lua.load("local t = {} for i = 1, 1e5 do t[i] = i end").exec().is_err());
        lua.load("keep = nil").exec().unwrap();
        lua.gc_collect().unwrap();
        assert_eq!(Meter::held(&lua), 0);
        lua.load("local t = {} for i = 1, 1e5 do t[i] = i end").exec().unwrap();
    }
}
