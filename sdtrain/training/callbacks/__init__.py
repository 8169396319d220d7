"""Small callbacks: each schedules one thing and logs it (EMA, sample grids, throughput)."""
