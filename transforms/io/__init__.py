"""The Beam-free foundation of the job's data: storage, shard readers, records, preprocessing, rows
and schemas, map storage, publication of runs, audit histories and progress."""
