"""The optional C extension (media/webrtc/_fastsend.c); everything else is in
pyproject.toml. Without a compiler the build goes on and the fan-out uses
its pure-Python path (same bytes on the wire)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "media.webrtc._fastsend",
            ["media/webrtc/_fastsend.c"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
    ],
)
