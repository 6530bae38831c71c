-- wrk script for benches/e2e/run.sh.
--   wrk ... -s requests.lua URL -- PATH [N]
-- PATH may contain RCPT, replaced by N distinct recipients (+3620xxxxxxx)
-- cycled through, so sends do not all name one number. The requests are
-- built once in init(), so per request wrk only picks the next one.
-- With WRK_DELAY_MS set (fractional allowed), each connection waits that
-- long after an answer before its next request: a closed loop with think
-- time, which fixes the offered rate at about connections / (latency +
-- delay). wrk 4.1 (Debian) has no --rate; this is the approximation.

local reqs = {}
local i = 0

function init(args)
  local path = args[1] or "/"
  local n = tonumber(args[2] or "1000")
  local s, e = string.find(path, "RCPT", 1, true)
  if not s then
    reqs[1] = wrk.format("GET", path)
    return
  end
  local head, tail = string.sub(path, 1, s - 1), string.sub(path, e + 1)
  for k = 1, n do
    reqs[k] = wrk.format("GET", head .. string.format("%%2B3620%07d", k) .. tail)
  end
end

function request()
  i = i + 1
  if i > #reqs then i = 1 end
  return reqs[i]
end

local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "")
if delay_ms and delay_ms > 0 then
  local whole = math.floor(delay_ms)
  local frac = delay_ms - whole
  function delay()
    -- wrk takes whole milliseconds: dither to keep the mean fractional.
    if math.random() < frac then return whole + 1 end
    return whole
  end
end
