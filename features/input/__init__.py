"""Stage one's input: finding images, decoding them, decode threads, face crops."""
