"""One photo in, a detailed 3D face out (``facedetail reconstruct``) and the measures of how good it is."""
