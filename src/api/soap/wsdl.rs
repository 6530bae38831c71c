//! The WSDL of the 2sms-compatible service (`GET …/Account.asmx?WSDL`):
//! WSDL 1.1, document/literal wrapped, one port type with a SOAP 1.1
//! binding (`AccountSoap`) and a SOAP 1.2 binding (`AccountSoap12`), as
//! ASMX publishes them, so stock clients (zeep, .NET, JAX-WS) load it.
//!
//! The request elements also declare the original's output-only elements
//! (`minOccurs="0"`), so clients generated from the original keep working;
//! the service ignores them.

use super::call::SERVICE_NS;
use super::render::push_escaped;

/// Renders the WSDL with `location` (an absolute URL) as both ports'
/// address.
pub fn wsdl(location: &str) -> String {
    let mut loc = String::with_capacity(location.len());
    push_escaped(&mut loc, &location.replace('"', "%22"));
    let ns = SERVICE_NS;
    let mut out = String::with_capacity(8 * 1024);
    out.push_str(&format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<wsdl:definitions xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/" xmlns:soap12="http://schemas.xmlsoap.org/wsdl/soap12/" xmlns:s="http://www.w3.org/2001/XMLSchema" xmlns:tns="{ns}" targetNamespace="{ns}">
  <wsdl:documentation xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/">Account credit operations of the 2sms Simple API, served by tollgate.</wsdl:documentation>
  <wsdl:types>
    <s:schema elementFormDefault="qualified" targetNamespace="{ns}">
      <s:element name="GetBalance">
        <s:complexType>
          <s:sequence>
            <s:element minOccurs="0" maxOccurs="1" name="Username" type="s:string"/>
            <s:element minOccurs="0" maxOccurs="1" name="Password" type="s:string"/>
            <s:element minOccurs="0" maxOccurs="1" name="AnyTimeBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="OffPeakBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="ResultText" type="s:string"/>
            <s:element minOccurs="0" maxOccurs="1" name="Code" type="s:int"/>
          </s:sequence>
        </s:complexType>
      </s:element>
      <s:element name="GetBalanceResponse">
        <s:complexType>
          <s:sequence>
            <s:element minOccurs="1" maxOccurs="1" name="GetBalanceResult" type="s:boolean"/>
            <s:element minOccurs="0" maxOccurs="1" name="AnyTimeBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="OffPeakBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="ResultText" type="s:string"/>
            <s:element minOccurs="1" maxOccurs="1" name="Code" type="s:int"/>
          </s:sequence>
        </s:complexType>
      </s:element>
      <s:element name="SubAccountGiveCredit">
        <s:complexType>
          <s:sequence>
            <s:element minOccurs="0" maxOccurs="1" name="Username" type="s:string"/>
            <s:element minOccurs="0" maxOccurs="1" name="Password" type="s:string"/>
            <s:element minOccurs="0" maxOccurs="1" name="SubAccount" type="s:string"/>
            <s:element minOccurs="0" maxOccurs="1" name="AnyTimeBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="OffPeakBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="ParentAnyTimeBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="ParentOffPeakBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="SubAnyTimeBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="SubOffPeakBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="ResultText" type="s:string"/>
            <s:element minOccurs="0" maxOccurs="1" name="Code" type="s:int"/>
          </s:sequence>
        </s:complexType>
      </s:element>
      <s:element name="SubAccountGiveCreditResponse">
        <s:complexType>
          <s:sequence>
            <s:element minOccurs="1" maxOccurs="1" name="SubAccountGiveCreditResult" type="s:boolean"/>
            <s:element minOccurs="0" maxOccurs="1" name="ParentAnyTimeBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="ParentOffPeakBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="SubAnyTimeBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="SubOffPeakBalance" type="s:decimal"/>
            <s:element minOccurs="0" maxOccurs="1" name="ResultText" type="s:string"/>
            <s:element minOccurs="1" maxOccurs="1" name="Code" type="s:int"/>
          </s:sequence>
        </s:complexType>
      </s:element>
    </s:schema>
  </wsdl:types>
"#
    ));
    for op in ["GetBalance", "SubAccountGiveCredit"] {
        out.push_str(&format!(
            r#"  <wsdl:message name="{op}SoapIn">
    <wsdl:part name="parameters" element="tns:{op}"/>
  </wsdl:message>
  <wsdl:message name="{op}SoapOut">
    <wsdl:part name="parameters" element="tns:{op}Response"/>
  </wsdl:message>
"#
        ));
    }
    out.push_str("  <wsdl:portType name=\"AccountSoap\">\n");
    for (op, doc) in [
        (
            "GetBalance",
            "Returns the any-time and off-peak balances of the account.",
        ),
        (
            "SubAccountGiveCredit",
            "Transfers credits to a sub-account; negative amounts move credits back.",
        ),
    ] {
        out.push_str(&format!(
            r#"    <wsdl:operation name="{op}">
      <wsdl:documentation xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/">{doc}</wsdl:documentation>
      <wsdl:input message="tns:{op}SoapIn"/>
      <wsdl:output message="tns:{op}SoapOut"/>
    </wsdl:operation>
"#
        ));
    }
    out.push_str("  </wsdl:portType>\n");
    for (binding, prefix) in [("AccountSoap", "soap"), ("AccountSoap12", "soap12")] {
        out.push_str(&format!(
            "  <wsdl:binding name=\"{binding}\" type=\"tns:AccountSoap\">\n    \
             <{prefix}:binding transport=\"http://schemas.xmlsoap.org/soap/http\"/>\n"
        ));
        for op in ["GetBalance", "SubAccountGiveCredit"] {
            out.push_str(&format!(
                r#"    <wsdl:operation name="{op}">
      <{prefix}:operation soapAction="{ns}{op}" style="document"/>
      <wsdl:input>
        <{prefix}:body use="literal"/>
      </wsdl:input>
      <wsdl:output>
        <{prefix}:body use="literal"/>
      </wsdl:output>
    </wsdl:operation>
"#
            ));
        }
        out.push_str("  </wsdl:binding>\n");
    }
    out.push_str(&format!(
        r#"  <wsdl:service name="Account">
    <wsdl:port name="AccountSoap" binding="tns:AccountSoap">
      <soap:address location="{loc}"/>
    </wsdl:port>
    <wsdl:port name="AccountSoap12" binding="tns:AccountSoap12">
      <soap12:address location="{loc}"/>
    </wsdl:port>
  </wsdl:service>
</wsdl:definitions>
"#
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wsdl_is_well_formed_and_has_both_bindings() {
        let text = wsdl("http://127.0.0.1:9500/WebServices/2.2/Simple/Account.asmx?a=1&b=\"2\"");
        let mut r = quick_xml::Reader::from_str(&text);
        let mut elements = 0;
        loop {
            match r.read_event().unwrap() {
                quick_xml::events::Event::Eof => break,
                quick_xml::events::Event::Start(_) | quick_xml::events::Event::Empty(_) => {
                    elements += 1
                }
                _ => {}
            }
        }
        assert!(elements > 50);
        assert!(text.contains("<soap:binding transport="));
        assert!(text.contains("<soap12:binding transport="));
        assert!(text.contains("location=\"http://127.0.0.1:9500/WebServices/2.2/Simple/Account.asmx?a=1&amp;b=%222%22\""));
        assert!(text.contains(
            "soapAction=\"http://www.2sms.com/WebServices/2.2/Simple/SubAccountGiveCredit\""
        ));
    }
}
