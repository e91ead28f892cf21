//! Bodies of Lua-visible Requests and Responses: streamed unless a script reads them.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use mlua::{Lua, UserData, UserDataFields};

use super::meter::Charge;
use crate::body::{self, Body};
use crate::script::scope::{EndsWithCall, Scope};

/// The state of a body, shared between its Request/Response and any `.body` handle.
pub enum BodySlot {
    /// No body at all.
    Empty,
    /// In memory, charged to the state (released when the bytes are sent or dropped).
    Bytes(Bytes, Charge),
    /// Not read yet: streamed when sent on, read when a script asks.
    Stream(Body),
    /// Read or moved away; a second read is an error (as in the Fetch API).
    Used,
    /// A stream closed unread when the handler call that got it ended (see
    /// [`crate::script::scope::Scope::end`]).
    Ended,
}

impl BodySlot {
    /// Bytes in memory, charged to `lua`'s state.
    pub fn bytes(lua: &Lua, data: Bytes) -> mlua::Result<Self> {
        let charge = Charge::new(lua, data.len())?;
        Ok(Self::Bytes(data, charge))
    }
}

const ENDED: &str =
    "body was not read before its handler call ended (a streamed body can be used only during the call that got it)";

/// A body shared by reference; moving it (into `Request.new`, `fetch`, …) leaves `Used`.
#[derive(Clone)]
pub struct SharedBody(pub Rc<RefCell<BodySlot>>);

impl SharedBody {
    /// A body; a stream made during a handler call is closed when that call ends, unless it
    /// was read or handed on (returned, or sent with `fetch`) by then.
    pub fn new(slot: BodySlot) -> Self {
        let body = Self(Rc::new(RefCell::new(slot)));
        if let Some(scope) = crate::script::scope::current() {
            body.end_with(&scope);
        }
        body
    }

    /// A stream is closed when `scope`'s call ends, unless read or handed on by then.
    pub fn end_with(&self, scope: &Scope) {
        if self.is_stream() {
            let slot: Rc<dyn EndsWithCall> = self.0.clone();
            scope.hold_stream(Rc::downgrade(&slot));
        }
    }

    /// Still a stream nobody has read.
    pub fn is_stream(&self) -> bool {
        matches!(*self.0.borrow(), BodySlot::Stream(_))
    }

    /// Read or moved away already (`bodyUsed`).
    pub fn is_used(&self) -> bool {
        matches!(*self.0.borrow(), BodySlot::Used | BodySlot::Ended)
    }

    /// No body at all (`.body` is nil).
    pub fn is_empty(&self) -> bool {
        matches!(*self.0.borrow(), BodySlot::Empty)
    }

    /// Moves the body out for sending; errors if it was already read.
    pub fn take(&self) -> mlua::Result<Body> {
        let previous = std::mem::replace(&mut *self.0.borrow_mut(), BodySlot::Used);
        match previous {
            BodySlot::Empty => {
                *self.0.borrow_mut() = BodySlot::Empty;
                Ok(body::empty())
            }
            BodySlot::Bytes(b, _) => Ok(body::full(b)),
            BodySlot::Stream(s) => Ok(s),
            BodySlot::Used => Err(mlua::Error::runtime("body has already been used")),
            BodySlot::Ended => {
                *self.0.borrow_mut() = BodySlot::Ended;
                Err(mlua::Error::runtime(ENDED))
            }
        }
    }

    /// Moves the body into a new slot (for copying a Request or Response).
    pub fn transfer(&self) -> mlua::Result<SharedBody> {
        let previous = std::mem::replace(&mut *self.0.borrow_mut(), BodySlot::Used);
        let slot = match previous {
            BodySlot::Empty => {
                *self.0.borrow_mut() = BodySlot::Empty;
                BodySlot::Empty
            }
            BodySlot::Used => return Err(mlua::Error::runtime("body has already been used")),
            BodySlot::Ended => {
                *self.0.borrow_mut() = BodySlot::Ended;
                return Err(mlua::Error::runtime(ENDED));
            }
            other => other,
        };
        Ok(SharedBody::new(slot))
    }

    /// Bytes already in memory, if the body is not a stream (lets redirects replay it).
    pub fn peek_bytes(&self) -> Option<Bytes> {
        match &*self.0.borrow() {
            BodySlot::Empty => Some(Bytes::new()),
            BodySlot::Bytes(b, _) => Some(b.clone()),
            _ => None,
        }
    }

    /// Reads the whole body (once), up to `limit` bytes.
    pub async fn read_all(&self, limit: usize) -> mlua::Result<Bytes> {
        let stream = self.take()?;
        body::collect_limited(stream, limit).await.map_err(mlua::Error::runtime)
    }

    /// Reads the body into memory and leaves a copy in place (for `:clone()`).
    pub async fn buffer(&self, lua: &Lua, limit: usize) -> mlua::Result<Bytes> {
        if let Some(b) = self.peek_bytes() {
            return Ok(b);
        }
        let data = self.read_all(limit).await?;
        let slot = BodySlot::bytes(lua, data.clone())?;
        *self.0.borrow_mut() = slot;
        Ok(data)
    }
}

/// Closes the stream a body still holds when its handler call has ended.
impl EndsWithCall for RefCell<BodySlot> {
    fn end(&self) {
        if let Ok(mut slot) = self.try_borrow_mut()
            && matches!(*slot, BodySlot::Stream(_))
        {
            *slot = BodySlot::Ended;
        }
    }
}

/// The `.body` handle a script passes to `Request.new`, `Response.new` or `fetch` to move a
/// body without buffering it.
#[derive(Clone)]
pub struct BodyHandle(pub SharedBody);

impl UserData for BodyHandle {
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("used", |_, this| Ok(this.0.is_used()));
    }
}
