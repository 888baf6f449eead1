# mobillm_default_cuda_archs(NVCC_VERSION_TEXT OUT): the default CUDA architectures for the nvcc
# whose `--version` output is NVCC_VERSION_TEXT: Jetson Xavier (72), Jetson Orin (87) and
# H100/H200 (90), as far as that nvcc compiles them. sm_90 needs CUDA >= 11.8 (JetPack 5 ships
# 11.4); CUDA 13 dropped sm_72, so Xavier builds with JetPack 5's CUDA.
function(mobillm_default_cuda_archs nvcc_version_text out)
  string(REGEX MATCH "release ([0-9]+\\.[0-9]+)" _match "${nvcc_version_text}")
  set(release "${CMAKE_MATCH_1}")
  if(release STREQUAL "")
    set(archs 72 87 90)  # unknown nvcc: the full list; -DCMAKE_CUDA_ARCHITECTURES overrides
  elseif(release VERSION_GREATER_EQUAL 13.0)
    set(archs 87 90)
    message(STATUS "mobillm: CUDA ${release} cannot build sm_72 (Jetson Xavier); build there with JetPack 5's CUDA 11.4")
  elseif(release VERSION_GREATER_EQUAL 11.8)
    set(archs 72 87 90)
  else()
    set(archs 72 87)
  endif()
  set(${out} ${archs} PARENT_SCOPE)
endfunction()
