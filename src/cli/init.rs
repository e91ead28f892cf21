//! `moat init [--recipe NAME] [DIR]`: a policy to start from, its tests, a moat.toml, and the
//! editor support (LuaLS annotations and a .luarc.json) so that completion and type checks
//! work in any editor using lua-language-server.

use std::path::Path;

/// A bundled recipe: a complete policy with its `moat test` file.
struct Recipe {
    name: &'static str,
    about: &'static str,
    policy: &'static str,
    tests: &'static str,
    /// Secrets the policy reads, declared in the moat.toml written with it.
    secrets: &'static [&'static str],
}

macro_rules! recipe {
    ($name:literal, $about:literal, [$($secret:literal),*]) => {
        Recipe {
            name: $name,
            about: $about,
            policy: include_str!(concat!("../../scripts/", $name, ".lua")),
            tests: include_str!(concat!("../../scripts/", $name, "_test.lua")),
            secrets: &[$($secret),*],
        }
    };
}

const RECIPES: &[Recipe] = &[
    recipe!("agent-sandbox", "deny by default, allow a list, intercept HTTPS, inject one credential", ["GITHUB_TOKEN"]),
    recipe!("github", "GitHub API token and git over HTTPS (x-access-token)", ["GITHUB_TOKEN"]),
    recipe!(
        "llm-keys",
        "OpenAI and Anthropic keys swapped in for placeholders",
        ["OPENAI_API_KEY", "ANTHROPIC_API_KEY"]
    ),
    recipe!("registries", "npm, PyPI, crates.io and Go modules, read-only", []),
    recipe!("aws", "AWS SigV4 re-signing for S3 and STS", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]),
    recipe!("bridges", "KV and bucket over HTTP, each container in its own space", []),
    recipe!("audit-log", "every forwarded request as a JSON line in a bucket", []),
    recipe!("budgets", "requests and bytes up per container and host per minute (moat.ratelimit)", []),
];

const INIT_POLICY: &str = include_str!("../../scripts/init-policy.lua");
const INIT_TESTS: &str = include_str!("../../scripts/init-policy_test.lua");
const INIT_CONFIG: &str = include_str!("../../scripts/init-moat.toml");

/// The LuaLS annotations, as written under `types/`.
const TYPES: &[(&str, &str)] = &[
    ("types/moat.lua", include_str!("../../stdlib/types/moat.lua")),
    ("types/moat-test.lua", include_str!("../../stdlib/types/moat-test.lua")),
    ("types/moat/json.lua", include_str!("../../stdlib/types/moat/json.lua")),
    ("types/moat/base64.lua", include_str!("../../stdlib/types/moat/base64.lua")),
    ("types/moat/hex.lua", include_str!("../../stdlib/types/moat/hex.lua")),
    ("types/moat/crypto.lua", include_str!("../../stdlib/types/moat/crypto.lua")),
    ("types/moat/auth.lua", include_str!("../../stdlib/types/moat/auth.lua")),
    ("types/moat/ratelimit.lua", include_str!("../../stdlib/types/moat/ratelimit.lua")),
];

const LUARC: &str = r#"{
  "$schema": "https://raw.githubusercontent.com/LuaLS/vscode-lua/master/setting/schema.json",
  "runtime.version": "Lua 5.4",
  "runtime.builtin": { "io": "disable", "debug": "disable", "package": "disable" },
  "workspace.library": ["types"],
  "workspace.checkThirdParty": false
}
"#;

/// Writes the files; refuses to overwrite any of them.
pub fn init(dir: &Path, recipe: Option<&str>) -> Result<(), String> {
    let files = files(recipe)?;
    for (name, _) in &files {
        if dir.join(name).exists() {
            return Err(format!("{} already exists; not overwriting", dir.join(name).display()));
        }
    }
    for (name, text) in &files {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        if !name.starts_with("types/") && name != ".luarc.json" {
            println!("wrote {}", p.display());
        }
    }
    println!("wrote {} (editor types for lua-language-server) and .luarc.json", dir.join("types").display());
    let secrets = recipe.and_then(|r| RECIPES.iter().find(|x| x.name == r)).map_or(&[][..], |r| r.secrets);
    if !secrets.is_empty() {
        println!(
            "set the secrets first: export {}",
            secrets.iter().map(|s| format!("{s}=...")).collect::<Vec<_>>().join(" ")
        );
    }
    println!("next: moat test && moat check && moat serve");
    Ok(())
}

/// What `init` writes for `recipe` (or the starter): name → text.
fn files(recipe: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let (policy_name, policy, tests, config, secrets) = match recipe {
        None => ("policy".to_string(), INIT_POLICY, INIT_TESTS, INIT_CONFIG.to_string(), &[][..]),
        Some(name) => {
            let r = RECIPES.iter().find(|r| r.name == name).ok_or_else(|| {
                let list: Vec<String> = RECIPES.iter().map(|r| format!("{} ({})", r.name, r.about)).collect();
                format!("no recipe {name:?}; the recipes are: {}", list.join(", "))
            })?;
            (r.name.to_string(), r.policy, r.tests, recipe_config(r), r.secrets)
        }
    };
    let mut out = vec![
        (format!("{policy_name}.lua"), policy.to_string()),
        (format!("{policy_name}_test.lua"), tests.to_string()),
        ("moat.toml".to_string(), config),
        (".luarc.json".to_string(), LUARC.to_string()),
        ("types/env.lua".to_string(), env_types(secrets)),
    ];
    out.extend(TYPES.iter().map(|(n, t)| (n.to_string(), t.to_string())));
    Ok(out)
}

/// The moat.toml written with a recipe: its class, gated by its tests, and its secrets.
fn recipe_config(r: &Recipe) -> String {
    let mut out = format!(
        "# moat configuration for the {name} recipe ({about}); see docs/config.md.\n\
         data_dir = \".moat\"\n\n\
         [[class]]\n\
         policy = \"{name}.lua\"\n\
         listen = \"127.0.0.1:3128\"\n\
         tests = \"{name}_test.lua\"             # a save that fails these tests is not served\n",
        name = r.name,
        about = r.about
    );
    if !r.secrets.is_empty() {
        out.push_str("\n[secrets]                              # read at start and at every reload\n");
        for s in r.secrets {
            out.push_str(&format!("{s} = {{ env = \"{s}\" }}\n"));
        }
    }
    out.push_str("\n[tls]\nca_dir = \"\"                            # moat's CA: \"\" = a new one each start; a folder keeps it\n");
    out
}

/// `types/env.lua`: the `env` fields the written moat.toml declares, for completion.
fn env_types(secrets: &[&str]) -> String {
    let mut out = String::from(
        "---@meta\n-- The bindings moat.toml declares (add a field when you add a binding).\n---@class Env\n",
    );
    for s in secrets {
        out.push_str(&format!("---@field {s} string secret\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every annotation file is Lua that compiles, and every global moat's API installs in a
    /// policy's state is annotated (so completion knows all of it).
    #[test]
    fn the_annotations_compile_and_cover_every_api_global() {
        let lua = mlua::Lua::new();
        for (name, text) in
            super::TYPES.iter().copied().chain([("types/env.lua", super::env_types(&["X"]).leak() as &str)])
        {
            lua.load(text).set_name(name).into_function().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let state = crate::script::sandbox::new_state(crate::script::sandbox::StateOptions {
            memory_limit: 64 << 20,
            body_buffer: 1 << 20,
            upstream: None,
            sink: None,
            modules: crate::script::sandbox::ModuleSource {
                dir: ".".into(),
                captured: Default::default(),
                read: Default::default(),
            },
            policy_path: Path::new("policy.lua"),
        })
        .unwrap();
        let lua_own = [
            "_G",
            "_VERSION",
            "assert",
            "collectgarbage",
            "error",
            "getmetatable",
            "ipairs",
            "load",
            "next",
            "pairs",
            "pcall",
            "print",
            "rawequal",
            "rawget",
            "rawlen",
            "rawset",
            "require",
            "select",
            "setmetatable",
            "tonumber",
            "tostring",
            "type",
            "xpcall",
            "warn",
            "string",
            "table",
            "math",
            "utf8",
            "coroutine",
            "os",
        ];
        let types = super::TYPES[0].1;
        for pair in state.globals().pairs::<String, mlua::Value>() {
            let (name, _) = pair.unwrap();
            if lua_own.contains(&name.as_str()) {
                continue;
            }
            assert!(
                types.contains(&format!("\n{name} = ")) || types.contains(&format!("\nfunction {name}(")),
                "global {name} has no annotation in stdlib/types/moat.lua"
            );
        }
    }

    #[test]
    fn every_recipe_and_the_starter_have_their_files() {
        for r in std::iter::once(None).chain(super::RECIPES.iter().map(|r| Some(r.name))) {
            let files = super::files(r).unwrap();
            assert!(files.iter().any(|(n, _)| n.ends_with("_test.lua")));
            assert!(files.iter().any(|(n, _)| n == "types/moat.lua"));
        }
        let e = super::files(Some("nope")).unwrap_err();
        assert!(e.starts_with("no recipe \"nope\"; the recipes are: agent-sandbox ("), "{e}");
    }
}
