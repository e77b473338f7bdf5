"""The one compiled part of ggufjac: products with quantized weights (ggufjac/_quantized_products.c).

Optional: where no C compiler is found the build goes on without it, and ggufjac dequantizes
and multiplies with torch instead (quantized_products.available() says which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ggufjac._quantized_products", ["ggufjac/_quantized_products.c"],
                             depends=["ggufjac/_quantized_products_kernels.h"],
                             extra_compile_args=["-O3", "-Wno-psabi"], optional=True)])
