-- wrk script for bench/edge.sh: every request asks for a page not asked
-- for before in this run (/page/PREFIX-N, N counting up from 1; one wrk
-- thread, so the sequence is the same in every run with the same PREFIX),
-- and the answers are counted by x-bext-cache state.
--
--   EDGE_PREFIX=a wrk -t1 -s bench/edge-pages.lua http://ADDR
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  hits = 0
  misses = 0
  others = 0
  prefix = os.getenv("EDGE_PREFIX") or "w"
end

function request()
  n = n + 1
  return wrk.format("GET", "/page/" .. prefix .. "-" .. n .. "?cc=public,max-age=3600&size=1024",
    { ["Host"] = "site.test" })
end

function response(status, headers, body)
  local state = headers["x-bext-cache"] or headers["X-Bext-Cache"]
  if state == "HIT" then
    hits = hits + 1
  elseif state == "MISS" then
    misses = misses + 1
  else
    others = others + 1
  end
end

function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    io.write(string.format("states: hit=%d miss=%d other=%d\n",
      t:get("hits"), t:get("misses"), t:get("others")))
  end
end
