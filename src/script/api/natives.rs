//! Native functions behind the bundled stdlib modules (`stdlib/moat/*.lua`).

use aws_lc_rs::{digest, hmac};
use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD};
use mlua::{Lua, LuaSerdeExt, Result, Table, Value};

/// JSON text of a Lua value; an empty table encodes as `[]` only via `json.array`.
pub fn json_encode(lua: &Lua, value: Value) -> Result<String> {
    let mut v: serde_json::Value = lua.from_value(value)?;
    integral_floats_as_integers(&mut v);
    serde_json::to_string(&v).map_err(mlua::Error::external)
}

/// Lua 5.4 keeps `6 / 2` as the float 3.0; JSON (and `JSON.stringify`) writes it as `3`, not
/// `3.0`. Whole floats that fit an i64 exactly are written as integers.
fn integral_floats_as_integers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
                && f.abs() <= 9.007_199_254_740_992e15
            {
                *n = serde_json::Number::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

pub fn json_decode(lua: &Lua, text: &[u8]) -> Result<Value> {
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| mlua::Error::runtime(format!("invalid JSON: {e}")))?;
    lua.to_value(&v)
}

/// Decoders accept text with or without `=` padding, as `atob` and most tools do: tokens and
/// keys are often copied without it. Encoders stay canonical.
const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_DECODE: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE_DECODE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

fn b64_decode(engine: &impl Engine, s: &[u8]) -> Result<Vec<u8>> {
    engine.decode(s).map_err(|e| mlua::Error::runtime(format!("invalid base64: {e}")))
}

/// The table passed to each stdlib module chunk as `...`.
pub fn table(lua: &Lua) -> Result<Table> {
    let t = lua.create_table()?;
    t.set("json_encode", lua.create_function(json_encode)?)?;
    t.set("json_decode", lua.create_function(|lua, s: mlua::LuaString| json_decode(lua, &s.as_bytes()))?)?;
    t.set("json_null", lua.null())?;
    t.set("json_array_mt", lua.array_metatable())?;
    t.set("b64_encode", lua.create_function(|_, s: mlua::LuaString| Ok(STANDARD.encode(s.as_bytes())))?)?;
    t.set(
        "b64_decode",
        lua.create_function(|lua, s: mlua::LuaString| lua.create_string(b64_decode(&STANDARD_DECODE, &s.as_bytes())?))?,
    )?;
    t.set("b64url_encode", lua.create_function(|_, s: mlua::LuaString| Ok(URL_SAFE_NO_PAD.encode(s.as_bytes())))?)?;
    t.set(
        "b64url_decode",
        lua.create_function(|lua, s: mlua::LuaString| lua.create_string(b64_decode(&URL_SAFE_DECODE, &s.as_bytes())?))?,
    )?;
    t.set(
        "hex_encode",
        lua.create_function(|_, s: mlua::LuaString| {
            Ok(s.as_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>())
        })?,
    )?;
    t.set(
        "hex_decode",
        lua.create_function(|lua, s: mlua::LuaString| {
            let raw = s.as_bytes();
            if !raw.len().is_multiple_of(2) {
                return Err(mlua::Error::runtime("invalid hex: odd length"));
            }
            let bytes = raw
                .chunks(2)
                .map(|p| std::str::from_utf8(p).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| mlua::Error::runtime("invalid hex digit"))?;
            lua.create_string(bytes)
        })?,
    )?;
    t.set(
        "sha256",
        lua.create_function(|lua, s: mlua::LuaString| {
            lua.create_string(digest::digest(&digest::SHA256, &s.as_bytes()))
        })?,
    )?;
    t.set(
        "hmac_sha256",
        lua.create_function(|lua, (key, msg): (mlua::LuaString, mlua::LuaString)| {
            let k = hmac::Key::new(hmac::HMAC_SHA256, &key.as_bytes());
            lua.create_string(hmac::sign(&k, &msg.as_bytes()))
        })?,
    )?;
    t.set(
        "random_bytes",
        lua.create_function(|lua, n: i64| {
            // Refused rather than cut: a caller asking for more would get fewer bytes unawares.
            const MAX: i64 = 1 << 20;
            if !(0..=MAX).contains(&n) {
                return Err(mlua::Error::runtime(format!("randomBytes: n must be 0 to {MAX} (1 MiB), got {n}")));
            }
            lua.create_string(random_bytes(n as usize)?)
        })?,
    )?;
    t.set(
        "random_uuid",
        lua.create_function(|_, ()| {
            let mut b = random_bytes(16)?;
            b[6] = (b[6] & 0x0f) | 0x40; // version 4
            b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Ok(format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]))
        })?,
    )?;
    Ok(t)
}

pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    crate::tls::random_bytes(n).map_err(mlua::Error::runtime)
}
