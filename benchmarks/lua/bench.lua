-- wrk script for the sessionscope benchmarks.
-- Usage: wrk ... -s bench.lua URL -- WORKLOAD
--   WORKLOAD: noop | read | write | mix (40% read, 40% write, 15% noop, 5% fail)
-- done() prints one line "BENCHJSON {...}" with latency percentiles (microseconds),
-- status counts, socket errors and the ids acknowledged by 2xx answers to POST /items.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local workload = "noop"
-- Globals, not locals: done() reads them from each thread with thread:get().
s2xx, s4xx, s5xx, sother = 0, 0, 0, 0
acked = {}
local post_body = '{"name":"load"}'
local post_headers = { ["Content-Type"] = "application/json" }

function init(args)
  workload = args[1] or "noop"
  math.randomseed(os.time() + tonumber(tostring(wrk.thread):match("0x(%x+)") or "0", 16) % 100000)
end

function request()
  local kind = workload
  if kind == "mix" then
    local r = math.random(100)
    if r <= 40 then kind = "read" elseif r <= 80 then kind = "write"
    elseif r <= 95 then kind = "noop" else kind = "fail" end
  end
  if kind == "read" then
    return wrk.format("GET", "/items/" .. math.random(1, 10000))
  elseif kind == "write" then
    return wrk.format("POST", "/items", post_headers, post_body)
  elseif kind == "fail" then
    return wrk.format("GET", "/fail")
  end
  return wrk.format("GET", "/noop")
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    s2xx = s2xx + 1
    if status == 201 then
      local id = body:match('"id":%s*(%d+)')
      if id then acked[#acked + 1] = tonumber(id) end
    end
  elseif status >= 400 and status < 500 then s4xx = s4xx + 1
  elseif status >= 500 then s5xx = s5xx + 1
  else sother = sother + 1 end
end

local function json_list(items)
  local parts = {}
  for i = 1, #items do parts[i] = string.format("%d", items[i]) end
  return "[" .. table.concat(parts, ",") .. "]"
end

function done(summary, latency, requests)
  local c2, c4, c5, co = 0, 0, 0, 0
  local ids = {}
  for _, t in ipairs(threads) do
    c2 = c2 + t:get("s2xx"); c4 = c4 + t:get("s4xx")
    c5 = c5 + t:get("s5xx"); co = co + t:get("sother")
    for _, id in ipairs(t:get("acked")) do ids[#ids + 1] = id end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"status":{"2xx":%d,"4xx":%d,"5xx":%d,"other":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},"acked":%s}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    c2, c4, c5, co,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, json_list(ids)))
end
