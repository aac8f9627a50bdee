"""asv (airspeed velocity) benchmarks: splitnn's hot paths, tracked across commits (asv.conf.json)."""
