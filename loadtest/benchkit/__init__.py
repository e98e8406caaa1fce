"""The pieces of loadtest/bench.py and loadtest/soak.py, one noun per module.

| module | what |
| --- | --- |
| `procs` | CPU, RSS, fds, sockets and children of a process, from /proc; the machine |
| `children` | child processes started and stopped by PID; waiting for HTTP readiness |
| `pubchild` | the JetStream publisher child process (and the realistic payload) |
| `rawws` | WebSocket on a raw socket: the stalled client, masked frames, deflate offer |
| `targets` | what is measured: the gateway, nats-server's listener, the naive relay |
| `clients` | the bench's picows clients and what they received |
| `report` | percentiles, late messages, median and worst runs, tables |
| `runner` | one measurement window, one point (repeats), setup and teardown |
| `scenarios` | grid, stall, storm, idle, workers, deflate |
"""
