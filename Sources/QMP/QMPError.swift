/// QEMU's error classes (QapiErrorClass). New code uses `GenericError`; the others exist for
/// compatibility with clients that test for them.
public enum QMPErrorClass: String, Sendable, Equatable, CaseIterable {
    case genericError = "GenericError"
    case commandNotFound = "CommandNotFound"
    case deviceNotActive = "DeviceNotActive"
    case deviceNotFound = "DeviceNotFound"
    case kvmMissingCap = "KVMMissingCap"
}

/// A failed command: the reply is `{"error": {"class": ..., "desc": ...}}`.
public struct QMPError: Error, Equatable, Sendable, CustomStringConvertible {
    public var errorClass: QMPErrorClass
    /// Human-readable text. Clients must not parse it; QEMU's texts are matched where known.
    public var desc: String

    public init(_ errorClass: QMPErrorClass, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    public var description: String { "\(errorClass.rawValue): \(desc)" }

    /// The error member of a reply.
    public var json: JSONValue { ["class": .string(errorClass.rawValue), "desc": .string(desc)] }

    public static func generic(_ desc: String) -> QMPError { QMPError(.genericError, desc) }

    public static func commandNotFound(_ command: String) -> QMPError {
        QMPError(.commandNotFound, "The command \(command) has not been found")
    }

    public static func deviceNotFound(_ device: String) -> QMPError {
        QMPError(.deviceNotFound, "Device '\(device)' not found")
    }

    // QEMU's texts for argument errors (qapi/qmp/qerror.h, qobject-input-visitor.c).
    public static func missingParameter(_ name: String) -> QMPError { .generic("Parameter '\(name)' is missing") }
    public static func unexpectedParameter(_ name: String) -> QMPError { .generic("Parameter '\(name)' is unexpected") }
    public static func invalidParameterType(_ name: String, expected: String) -> QMPError {
        .generic("Invalid parameter type for '\(name)', expected: \(expected)")
    }
    public static func invalidParameterValue(_ name: String, expected: String) -> QMPError {
        .generic("Parameter '\(name)' expects \(expected)")
    }
}

/// Reads a command's arguments the way QEMU's generated unmarshallers do: members are read by
/// name with their types checked, and `finish()` rejects any member nobody read.
///
///     var args = QMPArguments(arguments)
///     let guid = try args.string("guid")
///     try args.finish()
public struct QMPArguments: Sendable {
    public let object: JSONObject
    private var read: Set<String> = []

    public init(_ object: JSONObject) { self.object = object }

    private mutating func value(_ name: String) -> JSONValue? {
        read.insert(name)
        return object[name]
    }

    public mutating func optionalString(_ name: String) throws(QMPError) -> String? {
        guard let v = value(name) else { return nil }
        guard case .string(let s) = v else { throw .invalidParameterType(name, expected: "string") }
        return s
    }

    public mutating func string(_ name: String) throws(QMPError) -> String {
        guard let s = try optionalString(name) else { throw .missingParameter(name) }
        return s
    }

    public mutating func optionalInt(_ name: String) throws(QMPError) -> Int64? {
        guard let v = value(name) else { return nil }
        guard case .int(let i) = v else { throw .invalidParameterType(name, expected: "integer") }
        return i
    }

    public mutating func int(_ name: String) throws(QMPError) -> Int64 {
        guard let i = try optionalInt(name) else { throw .missingParameter(name) }
        return i
    }

    public mutating func optionalBool(_ name: String) throws(QMPError) -> Bool? {
        guard let v = value(name) else { return nil }
        guard case .bool(let b) = v else { throw .invalidParameterType(name, expected: "boolean") }
        return b
    }

    public mutating func bool(_ name: String) throws(QMPError) -> Bool {
        guard let b = try optionalBool(name) else { throw .missingParameter(name) }
        return b
    }

    public mutating func optionalArray(_ name: String) throws(QMPError) -> [JSONValue]? {
        guard let v = value(name) else { return nil }
        guard case .array(let a) = v else { throw .invalidParameterType(name, expected: "array") }
        return a
    }

    public mutating func optionalObject(_ name: String) throws(QMPError) -> JSONObject? {
        guard let v = value(name) else { return nil }
        guard case .object(let o) = v else { throw .invalidParameterType(name, expected: "object") }
        return o
    }

    /// Any value, unchecked (for arguments of several types).
    public mutating func optionalValue(_ name: String) -> JSONValue? { value(name) }

    /// Fails on the first member (in the order sent) that no read asked for.
    public func finish() throws(QMPError) {
        if let extra = object.members.first(where: { !read.contains($0.key) }) {
            throw .unexpectedParameter(extra.key)
        }
    }
}

/// One argument of a command, as its QAPI schema declares it: name, JSON type, whether required.
public struct QMPParameter: Sendable, Equatable {
    /// JSON types, named as QEMU's input visitor names them in "expected: ..." errors.
    public enum Kind: String, Sendable, Equatable {
        case string, integer, boolean, array, object
    }

    public let name: String
    public let kind: Kind
    public let isRequired: Bool

    public init(_ name: String, _ kind: Kind, required: Bool) {
        self.name = name
        self.kind = kind
        self.isRequired = required
    }

    public static func required(_ name: String, _ kind: Kind) -> QMPParameter { QMPParameter(name, kind, required: true) }
    public static func optional(_ name: String, _ kind: Kind) -> QMPParameter { QMPParameter(name, kind, required: false) }
}

extension QMPArguments {
    /// Checks `object` against `parameters` as QEMU's generated unmarshallers do before a command
    /// runs: each parameter in declaration order ("Parameter 'X' is missing", "Invalid parameter
    /// type for 'X', expected: T"), then any member not declared ("Parameter 'X' is unexpected").
    /// The result's getters then succeed for the declared parameters.
    public static func validated(_ object: JSONObject, against parameters: [QMPParameter]) throws(QMPError) -> QMPArguments {
        var args = QMPArguments(object)
        for p in parameters {
            let present: Bool
            switch p.kind {
            case .string: present = try args.optionalString(p.name) != nil
            case .integer: present = try args.optionalInt(p.name) != nil
            case .boolean: present = try args.optionalBool(p.name) != nil
            case .array: present = try args.optionalArray(p.name) != nil
            case .object: present = try args.optionalObject(p.name) != nil
            }
            if p.isRequired && !present { throw .missingParameter(p.name) }
        }
        try args.finish()
        return args
    }
}
