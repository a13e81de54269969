"""Build macros for the monolith_tf op library. See docs/bazel.md.

TensorFlow is reached only through the two labels below. They name targets of
the repository created by //third_party/tf:tf_configure.bzl, which resolves
them either to the pip-installed TensorFlow (standalone builds) or to
@org_tensorflow//tensorflow/core:{lib,framework} (TensorFlow Serving and other
source builds of TensorFlow). A workspace can also remap the repository name
with `repo_mapping`, or a caller can pass its own `tf_deps`.
"""

TF_HEADERS = "@local_config_tf//:tf_header_lib"
TF_FRAMEWORK = "@local_config_tf//:libtensorflow_framework"
TF_DEPS = [TF_HEADERS, TF_FRAMEWORK]

# Our own flags, as in the Makefile's CXXFLAGS (-I. is implicit in Bazel: the
# sources include "ops/..." relative to the repository root; -fPIC is added
# by Bazel where needed; optimisation comes from -c opt). The ABI and Eigen
# flags are not here on purpose: they travel with the TensorFlow dependency
# (see tf_configure.bzl), so that inside TensorFlow Serving, which builds
# with -D_GLIBCXX_USE_CXX11_ABI=0, nothing overrides its ABI.
MONOLITH_COPTS = [
    "-std=c++17",
    "-Wall",
    "-Wno-sign-compare",
    # sqrt need not set errno, so the optimizer loops vectorise (results are
    # unchanged: sqrt is correctly rounded either way). Same as the Makefile.
    "-fno-math-errno",
]

# TensorFlow headers use deprecated aliases of their own (Makefile: TF_WARN).
TF_OP_COPTS = MONOLITH_COPTS + ["-Wno-deprecated-declarations"]

# Where the pip layout puts TensorFlow relative to monolith_tf/_monolith_ops.so
# (site-packages/monolith_tf -> site-packages/tensorflow), as in the Makefile.
# In a Python process TensorFlow has loaded libtensorflow_framework.so.2
# already, so this only matters for loading the library outside Python.
PIP_SO_LINKOPTS = ["-Wl,-rpath,$$ORIGIN/../tensorflow"]

def monolith_tf_ops(
        name,
        srcs,
        hdrs = [],
        deps = [],
        tf_deps = TF_DEPS,
        copts = [],
        so_name = None,
        so_linkopts = PIP_SO_LINKOPTS,
        visibility = None,
        **kwargs):
    """TensorFlow ops as a static library and, optionally, a loadable .so.

    Defines:
      <name>     cc_library(alwayslink = 1) with the REGISTER_OP and
                 REGISTER_KERNEL_BUILDER sources. alwayslink keeps the static
                 registrars, which nothing references by symbol, when the
                 library is linked into a binary such as
                 tensorflow_model_server.
      <so_name>  if given: cc_binary(linkshared = 1) wrapping <name>, for
                 tf.load_op_library. Use a path such as
                 "monolith_tf/_monolith_ops.so" to choose where it lands
                 under bazel-bin.

    Args:
      name: name of the cc_library.
      srcs: op registration and kernel sources (and private headers).
      hdrs: public headers.
      deps: non-TensorFlow dependencies.
      tf_deps: TensorFlow dependencies; defaults to the two remappable labels.
      copts: extra compiler options.
      so_name: name of the shared-object target, or None for none.
      so_linkopts: linker options of the shared object.
      visibility: visibility of both targets.
      **kwargs: passed to the cc_library.
    """
    native.cc_library(
        name = name,
        srcs = srcs,
        hdrs = hdrs,
        copts = TF_OP_COPTS + copts,
        deps = deps + tf_deps,
        alwayslink = 1,
        visibility = visibility,
        **kwargs
    )
    if so_name:
        native.cc_binary(
            name = so_name,
            linkshared = 1,
            linkopts = so_linkopts,
            deps = [":" + name],
            visibility = visibility,
        )
