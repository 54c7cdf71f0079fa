// Internal error plumbing: kernels throw duca::Error, the C boundary turns it into a status + message.
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "duca_kernels.h"

namespace duca {

struct Error {
  duca_status status;
  std::string message;
};

// Messages are built without iostreams: a stream's locale facets belong to one libstdc++, and a library
// loaded into a process holding another copy lost every number after the first one (seen on the H200
// image, where it crashed the process).
template <class Part>
void append_part(std::string& text, const Part& part) {
  if constexpr (std::is_floating_point_v<Part>) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%g", static_cast<double>(part));
    text += buffer;
  } else if constexpr (std::is_enum_v<Part>) {
    text += std::to_string(static_cast<long long>(part));
  } else if constexpr (std::is_integral_v<Part>) {
    text += std::to_string(part);
  } else {
    text += part;
  }
}

template <class... Parts>
[[noreturn]] void fail(duca_status status, const Parts&... parts) {
  std::string text;
  (append_part(text, parts), ...);
  throw Error{status, std::move(text)};
}

inline void write_message(char* buffer, size_t capacity, const std::string& text) {
  if (buffer == nullptr || capacity == 0) return;
  const size_t length = text.size() < capacity - 1 ? text.size() : capacity - 1;
  std::memcpy(buffer, text.data(), length);
  buffer[length] = '\0';
}

// Runs `body` and maps every way it can fail onto a status; nothing escapes the C ABI.
template <class Body>
duca_status guarded(char* message, size_t message_size, Body&& body) {
  try {
    std::forward<Body>(body)();
    write_message(message, message_size, "");
    return DUCA_OK;
  } catch (const Error& error) {
    write_message(message, message_size, error.message);
    return error.status;
  } catch (const std::bad_alloc&) {
    write_message(message, message_size, "out of host memory");
    return DUCA_OUT_OF_MEMORY;
  } catch (const std::exception& error) {
    write_message(message, message_size, std::string("internal error: ") + error.what());
    return DUCA_INTERNAL_ERROR;
  }
}

}  // namespace duca
