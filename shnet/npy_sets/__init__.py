"""SCAN / 3SHNet precomputed ``.npy`` sets: their layout (:mod:`.format`), ``shnet import`` into a
cache (:mod:`.importer`), ``shnet export`` from one (:mod:`.exporter`), and the two commands
(:mod:`.cli`). Both directions are bit-exact and stream in bounded blocks."""
