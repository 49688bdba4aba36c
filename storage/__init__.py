"""State in LMDB: the fixed-width card record (`records`) and the store with its single
writer thread (`lmdb_store`)."""
