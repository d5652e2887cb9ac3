"""Edit-pair datasets: the example schema, the TFDS writer and reader, importers and the
grain input pipeline."""
