# Build, test and demo entry points. `make test` and `make demo` work on a fresh
# machine: each creates the virtualenv, installs the pinned requirements and
# builds the op library first. No Bazel needed (see BUILD for Bazel users).

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed
SO     := monolith_tf/_monolith_ops.so
OBJ    := build/obj

CORE_SRCS := $(wildcard ops/core/*.cc)
OP_SRCS   := ops/registrations/hash_table_ops.cc ops/kernels/hash_table_kernels.cc
HEADERS   := $(wildcard ops/core/*.h ops/kernels/*.h)
# -fno-math-errno: sqrt need not set errno, so the fused optimizer loops
# vectorise; results are unchanged (sqrt is correctly rounded either way).
CXXFLAGS  := -std=c++17 -O3 -fno-math-errno -fPIC -Wall -Wno-sign-compare -I.
# TF headers use deprecated aliases of their own; silence those, not ours.
TF_WARN   := -Wno-deprecated-declarations

.PHONY: all venv so core-test test demo bench clean

all: so

venv: $(STAMP)
$(STAMP): requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

# TensorFlow's own compile and link flags, asked once per install. setup.py
# builds against the interpreter running it: TF_PY=<python> TF_FLAGS_DEPS=.
TF_PY         ?= $(VPY)
TF_FLAGS_DEPS ?= $(STAMP)
build/tf_flags.mk: $(TF_FLAGS_DEPS)
	@mkdir -p build
	$(TF_PY) -c "import tensorflow as tf; \
print('TF_CFLAGS :=', ' '.join(tf.sysconfig.get_compile_flags())); \
print('TF_LFLAGS :=', ' '.join(tf.sysconfig.get_link_flags())); \
print('TF_VERSION :=', tf.__version__)" > $@.tmp 2>/dev/null && mv $@.tmp $@

-include build/tf_flags.mk

$(OBJ)/core/%.o: ops/core/%.cc $(HEADERS)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(OBJ)/tf/%.o: ops/%.cc $(HEADERS) build/tf_flags.mk
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(TF_WARN) $(TF_CFLAGS) -c $< -o $@

CORE_OBJS := $(patsubst ops/core/%.cc,$(OBJ)/core/%.o,$(CORE_SRCS))
OP_OBJS   := $(patsubst ops/%.cc,$(OBJ)/tf/%.o,$(OP_SRCS))

so: $(SO)
$(SO): $(CORE_OBJS) $(OP_OBJS) build/tf_flags.mk
	$(CXX) -shared $(CORE_OBJS) $(OP_OBJS) -o $@.tmp $(TF_LFLAGS) -Wl,-rpath,'$$ORIGIN/../tensorflow'
	echo "$(TF_VERSION)" > monolith_tf/_built_for_tensorflow.txt
	mv $@.tmp $@

build/core_test: $(CORE_OBJS) ops/core/tests/core_test.cc ops/core/tests/check.h
	$(CXX) $(CXXFLAGS) -pthread ops/core/tests/core_test.cc $(CORE_OBJS) -o $@

core-test: build/core_test
	./build/core_test

test: $(STAMP)
	$(MAKE) -j2 so build/core_test
	./build/core_test
	TF_CPP_MIN_LOG_LEVEL=2 $(VPY) -m pytest -q tests

demo: $(STAMP)
	$(MAKE) -j2 so
	TF_CPP_MIN_LOG_LEVEL=2 $(VPY) -m monolith_tf.demo
	TF_CPP_MIN_LOG_LEVEL=2 $(VPY) -m monolith_tf.serving_demo

bench: $(STAMP)
	$(MAKE) -j2 so
	$(VPY) bench/table_ops.py

clean:
	rm -rf build $(SO) monolith_tf/_built_for_tensorflow.txt
