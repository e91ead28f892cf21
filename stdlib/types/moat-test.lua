---@meta
-- `moat test`'s API for test files (POLICY_test.lua), for lua-language-server.

---The policy file this test file tests (default: its name without _test).
---@type string?
policy = nil
---Secret values for the tests (the real ones are never read).
---@type table<string, string>?
secrets = nil
---[vars] for the tests.
---@type table<string, string>?
vars = nil
---What names resolve to (every other name: 1.2.3.4, never dialled).
---@type table<string, string>?
hosts = nil

---@class TestRequest
---@field url string
---@field method? string default GET, or POST with a body
---@field headers? table<string, string>
---@field body? string
---@field container? string default "test"

---@class TestResult
---@field status integer
---@field headers table<string, string> lower-case names
---@field body string
---@field decision "handler"|"egress"|"deny"|"error"|"tunnel"|""
---@field detail string
---@field tunnelled boolean

---@class SentRequest
---@field method string
---@field url string
---@field host string
---@field path string
---@field headers table<string, string>
---@field body string

---@alias FixtureAnswer string|{ status?: integer, headers?: table<string, string>, body?: string }

---@class TestContext
---@field sent SentRequest[] Every request that reached the network, as moat sent it.
---@field env Env The engine's bindings.
local T = {}
---@param request TestRequest
---@return TestResult
function T.send(request) end
---@param match string host, *.suffix or *, optionally with a path prefix
---@param answer FixtureAnswer|fun(request: SentRequest): FixtureAnswer
function T.upstream(match, answer) end
---@param container string
---@param spec { allowedHosts?: string[], deniedHosts?: string[], outboundByHost?: table<string, { method: string, params?: any }>, outboundHandler?: { method: string, params?: any } }
function T.override(container, spec) end
---@param seconds number at most 60
function T.sleep(seconds) end
---@param actual any
---@param expected any
---@param label? string
function T.eq(actual, expected, label) end
---@param text any
---@param part string
---@param label? string
function T.contains(text, part, label) end
---@param value any
---@param label? string
function T.ok(value, label) end

---Registers a test.
---@param name string
---@param fn fun(t: TestContext)
function test(name, fn) end
