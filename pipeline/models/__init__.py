"""The models room: the teacher (a timm RegNetY and its checkpoint) and the DeiT student (two heads)."""
