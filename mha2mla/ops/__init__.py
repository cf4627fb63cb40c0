"""Pure torch math: the factorisations, RoPE algebra, attention forwards and least-squares fits the conversion is made
of. Tensors in, tensors out; no files, no models, no logging, and nothing else of mha2mla is imported here (a test
checks it), so each function can be read, tested and reused on its own."""
