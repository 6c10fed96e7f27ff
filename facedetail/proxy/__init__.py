"""Proxy estimation for in-the-wild photos: inputs, camera and shape fit, UV textures."""
