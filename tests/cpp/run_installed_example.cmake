# cmake -P script run by ctest: checks the installed CustomBN package the way a user meets it.
#  1. the package is installed, and not older than the library just built;
#  2. every installed header includes only headers that exist in the installed tree;
#  3. examples/cpp, a separate project, configures with find_package(CustomBN) against the
#     installed package (not the build tree), builds, and its program exits with 0;
#  4. with -DPYTHON=..., its checkpoint exchange: checkpoint_exchange.py prepare, the C++ training
#     program, checkpoint_exchange.py check (each must exit with 0).
foreach(var INSTALL_PREFIX PACKAGE_DIR INSTALLED_LIBRARY BUILT_LIBRARY TORCH_PREFIX
            EXAMPLE_SOURCE_DIR EXAMPLE_BINARY_DIR GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_installed_example.cmake: -D${var}=... is required")
  endif()
endforeach()

# 1. installed and current
if(NOT EXISTS "${PACKAGE_DIR}/CustomBNConfig.cmake" OR NOT EXISTS "${INSTALLED_LIBRARY}")
  message(FATAL_ERROR
    "CustomBN is not installed under ${INSTALL_PREFIX} (no ${PACKAGE_DIR}/CustomBNConfig.cmake "
    "or ${INSTALLED_LIBRARY}). Run `cmake --install <build dir>` before ctest; "
    "`make build-cmake` does both.")
endif()
file(TIMESTAMP "${BUILT_LIBRARY}" built_time "%s" UTC)
file(TIMESTAMP "${INSTALLED_LIBRARY}" installed_time "%s" UTC)
if(built_time GREATER installed_time)
  message(FATAL_ERROR
    "The installed ${INSTALLED_LIBRARY} is older than the built ${BUILT_LIBRARY}: "
    "run `cmake --install <build dir>` again before ctest.")
endif()

# 2. installed headers are self-contained within include/
set(include_root "${INSTALL_PREFIX}/include")
file(GLOB_RECURSE headers "${include_root}/custom_bn/*.h")
if(NOT headers)
  message(FATAL_ERROR "No headers installed under ${include_root}/custom_bn")
endif()
foreach(header IN LISTS headers)
  get_filename_component(header_dir "${header}" DIRECTORY)
  file(STRINGS "${header}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*[\"<]custom_bn/|^[ \t]*#[ \t]*include[ \t]*\"")
  foreach(line IN LISTS lines)
    if(line MATCHES "\"([^\"]+)\"")
      # Quoted: found next to the including header, or under include/.
      set(target "${CMAKE_MATCH_1}")
      if(NOT EXISTS "${header_dir}/${target}" AND NOT EXISTS "${include_root}/${target}")
        message(FATAL_ERROR "${header} includes \"${target}\", which is not installed")
      endif()
    elseif(line MATCHES "<(custom_bn/[^>]+)>")
      if(NOT EXISTS "${include_root}/${CMAKE_MATCH_1}")
        message(FATAL_ERROR "${header} includes <${CMAKE_MATCH_1}>, which is not installed")
      endif()
    endif()
  endforeach()
endforeach()
list(LENGTH headers header_count)
message(STATUS "${header_count} installed headers include only installed headers")

# 3. the example project against the installed package
file(REMOVE_RECURSE "${EXAMPLE_BINARY_DIR}")
set(configure_args -S "${EXAMPLE_SOURCE_DIR}" -B "${EXAMPLE_BINARY_DIR}" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${INSTALL_PREFIX};${TORCH_PREFIX}" -DCMAKE_BUILD_TYPE=Release)
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" ${configure_args} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "Configuring ${EXAMPLE_SOURCE_DIR} against the installed package failed")
endif()

file(STRINGS "${EXAMPLE_BINARY_DIR}/CMakeCache.txt" found_dir REGEX "^CustomBN_DIR:")
string(REGEX REPLACE "^CustomBN_DIR:[A-Z]+=" "" found_dir "${found_dir}")
get_filename_component(found_dir "${found_dir}" REALPATH)
get_filename_component(expected_dir "${PACKAGE_DIR}" REALPATH)
if(NOT found_dir STREQUAL expected_dir)
  message(FATAL_ERROR "The example found CustomBN in '${found_dir}', not in the installed "
                      "package '${expected_dir}'")
endif()

execute_process(COMMAND "${CMAKE_COMMAND}" --build "${EXAMPLE_BINARY_DIR}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "Building the example against the installed package failed")
endif()

execute_process(COMMAND "${EXAMPLE_BINARY_DIR}/custom_bn_example" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "The example program failed (exit status ${rc})")
endif()

# 4. the checkpoint exchange with Python
if(NOT PYTHON)
  message(STATUS "No -DPYTHON: the checkpoint exchange with Python is not run")
  return()
endif()
set(exchange_dir "${EXAMPLE_BINARY_DIR}/exchange")
foreach(command IN ITEMS
        "${PYTHON};${EXAMPLE_SOURCE_DIR}/checkpoint_exchange.py;prepare;${exchange_dir}"
        "${EXAMPLE_BINARY_DIR}/custom_bn_train_checkpoint;${exchange_dir}"
        "${PYTHON};${EXAMPLE_SOURCE_DIR}/checkpoint_exchange.py;check;${exchange_dir}")
  execute_process(COMMAND ${command} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    list(JOIN command " " shown)
    message(FATAL_ERROR "The checkpoint exchange failed at `${shown}` (exit status ${rc})")
  endif()
endforeach()
