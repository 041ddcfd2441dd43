# The Metal part of the build (included by CMakeLists.txt on macOS with an MLX built with
# Metal; tests/test_macos_checks.py configures it on Linux with MLX's mlx_build_metallib
# mocked). Inputs: the tqmetal_core target, MLX_INCLUDE_DIRS, Python_EXECUTABLE, TQMETAL_ROOT
# (the project directory). Outputs: TQMETAL_METALLIB_FILE (the metallib to install, or unset).
if(NOT TQMETAL_ROOT)
  get_filename_component(TQMETAL_ROOT ${CMAKE_CURRENT_LIST_DIR} DIRECTORY)
endif()

set(TQMETAL_METALLIB "AUTO" CACHE STRING
    "Build tqmetal_kernels.metallib: AUTO (when xcrun finds a Metal compiler), ON, OFF")
# Metal 3.1 (macOS 14) is what MLX's wheels target (MLXConfig.cmake: Metal version 310)
# and what MLX's bfloat needs; a newer Xcode would otherwise build for its own macOS.
set(TQMETAL_METAL_DEPLOYMENT_TARGET "14.0" CACHE STRING "macOS deployment target of the metallib (>= 14.0)")
if(TQMETAL_METAL_DEPLOYMENT_TARGET VERSION_LESS 14.0)
  message(FATAL_ERROR "TQMETAL_METAL_DEPLOYMENT_TARGET ${TQMETAL_METAL_DEPLOYMENT_TARGET}: "
                      "MLX's Metal kernels (bfloat) need macOS 14.0 / Metal 3.1")
endif()
set(TQMETAL_METAL_DIR ${TQMETAL_ROOT}/metal)
set(TQMETAL_METAL_SOURCES ${TQMETAL_METAL_DIR}/sdpa_int4.metal ${TQMETAL_METAL_DIR}/sdpa_int4_prefill.metal
    ${TQMETAL_METAL_DIR}/sdpa_int4_copy.metal)
file(GLOB TQMETAL_METAL_HEADERS CONFIGURE_DEPENDS ${TQMETAL_METAL_DIR}/*.h)
set(TQMETAL_MLX_INCLUDES ${MLX_INCLUDE_DIRS})
list(FILTER TQMETAL_MLX_INCLUDES EXCLUDE REGEX "^$")

target_sources(tqmetal_core PRIVATE ${TQMETAL_ROOT}/csrc/metal/sdpa_int4_metal.cpp)

# The embedded sources (always: they are the fallback where the metallib is missing).
set(TQMETAL_GEN_DIR ${CMAKE_CURRENT_BINARY_DIR}/generated)
set(TQMETAL_EMBED_INCLUDES ${TQMETAL_MLX_INCLUDES})
list(TRANSFORM TQMETAL_EMBED_INCLUDES PREPEND "-I")
add_custom_command(
  OUTPUT ${TQMETAL_GEN_DIR}/tqmetal_kernel_sources.h
  COMMAND "${Python_EXECUTABLE}" ${TQMETAL_ROOT}/csrc/metal/embed_sources.py
          --header ${TQMETAL_GEN_DIR}/tqmetal_kernel_sources.h --root ${TQMETAL_ROOT}
          ${TQMETAL_EMBED_INCLUDES} ${TQMETAL_METAL_SOURCES}
  DEPENDS ${TQMETAL_ROOT}/csrc/metal/embed_sources.py ${TQMETAL_METAL_SOURCES} ${TQMETAL_METAL_HEADERS}
  COMMENT "Embedding the expanded Metal kernel sources"
  VERBATIM)
add_custom_target(tqmetal_kernel_sources DEPENDS ${TQMETAL_GEN_DIR}/tqmetal_kernel_sources.h)
add_dependencies(tqmetal_core tqmetal_kernel_sources)
target_include_directories(tqmetal_core PRIVATE ${TQMETAL_GEN_DIR})

# The metallib, when a Metal compiler is there.
set(TQMETAL_METALLIB_STATUS "")
if(TQMETAL_METALLIB STREQUAL "OFF")
  set(TQMETAL_METALLIB_STATUS "TQMETAL_METALLIB=OFF")
else()
  execute_process(
    COMMAND xcrun -sdk macosx metal --version
    RESULT_VARIABLE _tq_metal_rc OUTPUT_VARIABLE _tq_metal_out ERROR_VARIABLE _tq_metal_err
    OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_STRIP_TRAILING_WHITESPACE TIMEOUT 60)
  if(NOT _tq_metal_rc STREQUAL "0")
    string(REGEX REPLACE "[^A-Za-z0-9 _.:,;/()=+-]+" " " _tq_metal_err "${_tq_metal_err}")
    set(TQMETAL_METALLIB_STATUS "xcrun -sdk macosx metal failed (${_tq_metal_rc}): ${_tq_metal_err}")
    if(TQMETAL_METALLIB STREQUAL "ON")
      message(FATAL_ERROR "TQMETAL_METALLIB=ON but ${TQMETAL_METALLIB_STATUS}. Install Xcode's Metal "
                          "toolchain (Xcode 26: xcodebuild -downloadComponent MetalToolchain)")
    endif()
  endif()
endif()
if(TQMETAL_METALLIB_STATUS STREQUAL "")
  message(STATUS "tqmetal: building tqmetal_kernels.metallib (macOS ${TQMETAL_METAL_DEPLOYMENT_TARGET})")
  mlx_build_metallib(
    TARGET tqmetal_kernels_metallib
    TITLE tqmetal_kernels
    SOURCES ${TQMETAL_METAL_SOURCES}
    INCLUDE_DIRS ${TQMETAL_METAL_DIR} ${TQMETAL_MLX_INCLUDES}
    DEPS ${TQMETAL_METAL_HEADERS}
    DEPLOYMENT_TARGET ${TQMETAL_METAL_DEPLOYMENT_TARGET}
    OUTPUT_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR})
  add_dependencies(tqmetal_core tqmetal_kernels_metallib)
  set(TQMETAL_METALLIB_FILE ${CMAKE_CURRENT_BINARY_DIR}/tqmetal_kernels.metallib)
  target_compile_definitions(tqmetal_core PRIVATE TQMETAL_METALLIB_BUILT=1)
else()
  message(STATUS "tqmetal: no metallib (${TQMETAL_METALLIB_STATUS}); the kernels are compiled at run time")
  target_compile_definitions(tqmetal_core PRIVATE TQMETAL_METALLIB_BUILT=0
                             "TQMETAL_METALLIB_STATUS=\"${TQMETAL_METALLIB_STATUS}\"")
endif()
